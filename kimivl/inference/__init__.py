"""Generation: the compressed cache, prefill and decode, sampling, chat turns. ``PREFILL_CHUNK`` lives here, where the
command line's help reads it without importing torch."""

PREFILL_CHUNK = 2048  # prompt tokens per prefill pass: bounds the activations (kimivl.inference.memory)
