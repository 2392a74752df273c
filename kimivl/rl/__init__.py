"""Reinforcement learning: rollouts, rule rewards, OPMD / GRPO objectives, problem sampling, the RL loop."""
