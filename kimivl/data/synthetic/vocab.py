"""Small closed vocabularies shared by the generators, so a tiny model can learn to read and name them."""

WORDS = tuple(
    """
about above across act add after again age ago air all also always and animal answer any apple area arm art
ask away baby back bad ball bank base bear beat bed before begin bell best bird black block blue boat body
bone book both box boy bread bring brown build busy buy cake call came camp can car card care carry case cat
cell chair change cheap chip city class clean clear climb clock close cloud coat cold come cook cool copy
corn cost count cow cup cut dark day deep desk dog door down draw dream dress drink drive drop dry duck dust
each early earth east easy eat edge egg end even ever eye face fact fair fall farm fast fish five flat floor
flow fly food foot form four free fresh friend frog full game garden gate gift girl give glad glass goat
gold good grass gray great green ground group grow hair half hand happy hard hat have head hear heart heat
help here high hill hold home hope horse hot hour house idea inch iron island jump just keep kind king kite
lake land large last late laugh lead leaf learn left leg less letter light line lion list little long look
love low lunch made mail main make man map mark meat meet milk mind moon more most mouse move much music
name near neck need nest new next nice night nine noise north nose note number ocean off oil old one open
orange other over page paint paper park part party path pen people pick pig pink place plan plant play point
pond pool poor post pot print pull push queen quick quiet rain read real red rest rice rich ride right ring
river road rock roof room root rope rose round row rule run safe sail salt same sand save say school sea
seat seed seven shape sheep ship shoe shop short show side sign sing sister sit six size sky sleep slow
small smile snow soft song soup south space speak spring square stand star start step stone stop story
street sun table tail take talk tall team ten test thank thing three time tiny today tooth top town toy
train tree true turn two under up use valley very voice wait walk wall warm wash watch water wave way week
well west wet whale wheel white wide wind window winter wish wood word work world write yard year yellow
young zero
""".split()
)  # noqa: SIM905 (a word list reads best as text)

GUI_BUTTONS = (
    "Save",
    "Open",
    "Cancel",
    "OK",
    "Delete",
    "Search",
    "Send",
    "Next",
    "Back",
    "Print",
    "Help",
    "Login",
    "Submit",
    "Edit",
    "Copy",
    "Paste",
    "Share",
    "Close",
    "Undo",
    "Redo",
    "Home",
    "Settings",
    "Add",
    "Remove",
    "Apply",
    "Reset",
    "Upload",
    "Download",
    "Play",
    "Stop",
)
GUI_FIELDS = (
    "Name",
    "Email",
    "Password",
    "City",
    "Phone",
    "Address",
    "User",
    "Age",
    "Title",
    "Date",
    "Country",
    "Note",
)

NUMBER_WORDS = (
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
    "twenty",
)

NAMES = (
    "Ann",
    "Ben",
    "Cara",
    "Dan",
    "Eva",
    "Finn",
    "Gus",
    "Hana",
    "Ivo",
    "Jade",
    "Kai",
    "Lena",
    "Max",
    "Nora",
    "Omar",
    "Pia",
    "Raj",
    "Sara",
    "Tom",
    "Uma",
    "Vic",
    "Will",
    "Yara",
    "Zoe",
)
