"""The demo model's task set: what it must answer, with which emotion and text, and what it
must ignore.

Three kinds of foreground items:
- sound events (proactive alerts): a fixed reply per event type;
- spoken commands and questions: several phrasings each. Evaluation speaks the same phrasings
  with voices, speeds, pitches, levels and noise never heard in training: the demo model
  recognises the commands it was taught, it does not understand unseen paraphrases;
- distractors that must get no reply: unrelated sentences (held-out ones for evaluation).
Backgrounds (noise, hum, music, babble) never get a reply either.
"""
from __future__ import annotations

from dataclasses import dataclass

from listenloop.protocol import EMOTION_NAMES as EMOTIONS  # noqa: F401
from listenloop.protocol import RELEASE_SYSTEM_PROMPT as SYSTEM_PROMPT  # noqa: F401 - the release prompt, exactly

from .sounds import SOUND_EVENTS


@dataclass(frozen=True)
class Reply:
    emotion: str  # one of EMOTIONS
    text: str


@dataclass(frozen=True)
class Command:
    name: str
    phrases: tuple[str, ...]
    reply: Reply


EVENT_REPLIES: dict[str, Reply] = {
    "smoke_alarm": Reply("URGENT", "Smoke alarm! Please check the kitchen."),
    "doorbell": Reply("NORMAL", "Someone is at the door."),
    "phone_ring": Reply("NORMAL", "Your phone is ringing."),
    "knocking": Reply("NORMAL", "Someone is knocking."),
    "glass_break": Reply("URGENT", "I heard glass breaking. Is everyone okay?"),
    "kettle_whistle": Reply("NORMAL", "The kettle is boiling."),
}

COMMANDS: tuple[Command, ...] = (
    Command(
        "lights_on",
        ("turn on the lights", "lights on please", "could you switch the lights on", "switch on the light",
         "turn the lights on", "please put the lights on", "can you turn on the light"),
        Reply("NORMAL", "Turning on the lights."),
    ),
    Command(
        "lights_off",
        ("turn off the lights", "lights off please", "could you switch the lights off", "switch off the light",
         "turn the lights off", "please put the lights out", "can you turn off the light"),
        Reply("NORMAL", "Turning off the lights."),
    ),
    Command(
        "capabilities",
        ("what can you do", "what are you able to do", "tell me what you can do", "what do you do",
         "what can you help me with", "what are you good at"),
        Reply("NORMAL", "I can listen for alarms, doorbells and simple commands."),
    ),
    Command(
        "stop",
        ("stop", "stop that", "please stop", "stop it", "stop now", "okay stop"),
        Reply("NORMAL", "Okay, stopping."),
    ),
    Command(
        "help",
        ("help", "I need help", "help me please", "somebody help", "please help me",
         "I need some help"),
        Reply("URGENT", "I'm here. What do you need?"),
    ),
    Command(
        "volume_up",
        ("turn the volume up", "louder please", "increase the volume", "turn it up", "make it louder",
         "volume up please"),
        Reply("NORMAL", "Turning the volume up."),
    ),
    Command(
        "timer",
        ("set a timer for five minutes", "start a five minute timer", "five minute timer please",
         "time five minutes", "set a five minute timer", "can you start a timer for five minutes"),
        Reply("NORMAL", "Timer set for five minutes."),
    ),
    Command(
        "greeting",
        ("hello", "hi there", "good morning", "hey", "hello there", "good evening"),
        Reply("HAPPY", "Hello! I'm listening."),
    ),
)

# Speech that does not address the assistant: it must stay silent through it.
TRAIN_DISTRACTORS: tuple[str, ...] = (
    "the weather was lovely yesterday afternoon",
    "I think we should paint the fence green",
    "my brother bought a new bicycle last week",
    "the meeting has been moved to Thursday",
    "did you see the football match on Sunday",
    "she keeps her keys in the blue bowl",
    "we ran out of milk again",
    "the train was twenty minutes late this morning",
    "I'm reading a book about ancient Rome",
    "they are building a new bridge across the river",
    "the cat sleeps on the sofa all day",
    "tomorrow I have to call the dentist",
    "this soup needs a little more salt",
    "the garden looks better after the rain",
    "he plays the piano every evening",
    "we should visit grandma next month",
    "the printer in the office is broken again",
    "I forgot my umbrella on the bus",
    "the price of coffee went up",
    "our neighbours have a very noisy dog",
    "that film was much longer than I expected",
    "the children are playing in the park",
    "please remember to water the plants",
    "I like my tea without sugar",
    "the shop closes at six on Saturdays",
    "we drove to the coast for the weekend",
    "my phone battery lasts all day now",
    "the new restaurant downtown is quite good",
    "I need to finish this report by Friday",
    "the mountains were covered in snow",
    "the kids want pancakes for breakfast",
    "I left the car at the garage this morning",
    "our flight leaves at half past seven",
    "she painted a picture of the harbour",
    "the baby finally fell asleep",
    "I can never remember his last name",
    "the hotel room had a view of the sea",
    "we had pizza for dinner on Friday",
    "the post office is next to the bank",
    "my laptop is getting really slow",
    "he works at the hospital on weekends",
    "the tomatoes in the garden are ripe",
    "I watched a documentary about whales",
    "there was a long queue at the supermarket",
    "the bridge is closed for repairs",
    "she speaks three languages fluently",
    "we need new curtains for the bedroom",
    "the football season starts in August",
    "I found an old photo of my parents",
    "they sold their house in the country",
    "the soup was too hot to eat",
    "my cousin is getting married in June",
    "the wind knocked over the bins last night",
    "I have a meeting with the bank on Monday",
    "the museum has a new dinosaur exhibit",
    "he always forgets to close the gate",
    "the lake was frozen all winter",
    "we should order more paper for the office",
    "the bus stop moved to the other side",
    "I'd like to learn how to bake bread",
)

# Many more distinct everyday sentences, generated from templates: with only a few dozen
# sentences the model took any unfamiliar one for a command (it answered 14 of 16 false
# replies during or right after a distractor). Deterministic, so every run draws the same set.
_PEOPLE = (
    "my sister", "my brother", "our neighbour", "the teacher", "my uncle", "the old man next door",
    "her husband", "his daughter", "the doctor", "our manager", "my friend Sam", "the kids",
    "the new student", "my grandmother", "the postman", "their son", "a woman from work",
    "the taxi driver", "my colleague", "the farmer", "Anna", "David", "the twins", "our landlord",
)
_DEEDS = (
    "bought a new car", "painted the garden fence", "baked a chocolate cake", "lost a wallet",
    "went to the market", "visited the museum", "fixed the old radio", "planted some roses",
    "wrote a long letter", "cooked a big dinner", "cleaned the garage", "sold the piano",
    "found a small kitten", "missed the last bus", "read the whole newspaper", "moved to another city",
    "started a new job", "took the dog for a walk", "forgot the password", "ordered a pizza",
    "washed the windows", "climbed the hill", "caught a cold", "called the bank", "booked a holiday",
    "won a prize", "repaired the bicycle", "watched an old film", "borrowed a ladder",
    "carried the boxes upstairs", "met an old friend", "sang in the choir", "broke a cup",
    "studied for the exam", "ate too much cake",
)
_WHEN = (
    "", "yesterday", "last week", "this morning", "on Tuesday", "in the summer", "after lunch",
    "two days ago", "last night", "at the weekend", "before work", "in March",
)
_THINGS = (
    "the kitchen table", "this coffee", "the new sofa", "the garden", "the car park", "that jacket",
    "the river", "our office", "the old bridge", "the soup", "my bicycle", "the school bus",
    "the hotel", "this book", "the beach", "the bakery", "the road to town", "the printer",
    "the football pitch", "her dress", "the market", "the playground",
)
_STATES = (
    "is too small", "is very expensive", "looks wonderful", "was really crowded", "is far too cold",
    "seems a bit old", "was quite noisy", "is closed today", "smells lovely", "was full of people",
    "is getting busy", "looked empty", "is nicer in spring", "was better last year",
)


def _generated_distractors() -> tuple[str, ...]:
    deeds = [" ".join(filter(None, (who, did, when))) for who in _PEOPLE for did in _DEEDS for when in _WHEN]
    states = [f"{thing} {state}" for thing in _THINGS for state in _STATES]
    return tuple(deeds + states)


GENERATED_DISTRACTORS = _generated_distractors()
P_GENERATED = 0.7  # share of training distractors drawn from the generated set

EVAL_DISTRACTORS: tuple[str, ...] = (
    "the library opens late on Wednesdays",
    "my sister moved to a small flat near the station",
    "we planted tomatoes and beans this spring",
    "the bus driver waved at the children",
    "I usually go running before breakfast",
    "the old clock in the hall stopped working",
    "they painted the kitchen yellow last year",
    "there is a new bakery on the corner",
    "the concert tickets sold out in an hour",
    "he repaired the roof before the storm",
)


# Training-only speech that shares words with the commands but asks nothing: the model must
# hear the whole utterance, not spot one word ("turn", "lights", "off", "help", "five minutes").
# None contains a command phrase (checked below), so no label contradicts a command's.
CONFUSABLE_DISTRACTORS: tuple[str, ...] = (
    "I turned off the radio in the car", "the lights in the hall were on all night",
    "she switched the heating off this morning", "he turned the corner by the church",
    "the kitchen light is a bit too bright", "we turned up late to the party",
    "the volume of that box is quite small", "my brother helped me paint the door",
    "they helped the old man across the road", "the bus stopped at the station",
    "the rain stopped after lunch", "the music was louder than last year",
    "it only takes five minutes to walk there", "the timer on the oven is broken",
    "the train was five minutes early", "the hellos at the door were loud",
    "good mornings are rare in winter", "she waved at the neighbours",
    "I can do the shopping on Friday", "what a lovely garden they have",
    "the lamp in the bedroom needs a new bulb", "you can put the box on the shelf",
    "the light from the window woke me up", "he turned off the motorway at the exit",
    "the sound of the sea is very calming", "we switched to a new phone company",
    "nobody answered the door at the office", "the children stopped playing at six",
    "the helpful man closes the shop at five", "my sister turned thirty on Sunday",
    "the volume knob on the radio is loose", "I set the table for dinner",
    "she started a new course in March", "the oven takes ten minutes to warm up",
    "they put the lights up for the festival", "he offered to carry the shopping",
    "the dog barks when someone knocks", "hi fi systems were popular in the eighties",
    "the hero of the film never stops talking", "we need some helpers in the garden",
)


def distractors(split: str) -> tuple[str, ...]:
    """Every distractor sentence of a split."""
    if split == "train":
        return TRAIN_DISTRACTORS + GENERATED_DISTRACTORS
    if split == "eval":
        return EVAL_DISTRACTORS
    raise ValueError(f"split must be 'train' or 'eval', got {split!r}")


def pick_distractor(rng, split: str) -> str:
    """One distractor sentence of a split. Training draws from the hand-written sentences or,
    more often, the generated ones; evaluation draws only its own held-out sentences."""
    if split == "eval":
        return str(rng.choice(EVAL_DISTRACTORS))
    if split != "train":
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    return str(rng.choice(GENERATED_DISTRACTORS if rng.random() < P_GENERATED else TRAIN_DISTRACTORS))


def _all_replies() -> tuple[Reply, ...]:
    replies = list(EVENT_REPLIES.values()) + [c.reply for c in COMMANDS]
    return tuple(dict.fromkeys(replies))  # unique, in a fixed order


# Replies are stored in the feature cache by their index in this tuple.
REPLIES: tuple[Reply, ...] = _all_replies()
REPLY_INDEX: dict[Reply, int] = {r: i for i, r in enumerate(REPLIES)}

# What a chunk mostly contains, for the training's auxiliary per-chunk loss on the encoder
# (dense supervision: every chunk has a class, while replies are sparse).
CONTENT_CLASSES: tuple[str, ...] = ("background", *EVENT_REPLIES, *(c.name for c in COMMANDS), "distractor")
CONTENT_INDEX: dict[str, int] = {name: i for i, name in enumerate(CONTENT_CLASSES)}

_spoken = {p for c in COMMANDS for p in c.phrases}
if set(distractors("train")) & (set(EVAL_DISTRACTORS) | _spoken) or set(EVAL_DISTRACTORS) & _spoken:
    raise RuntimeError("distractor sentences must be held out and never be a command phrase")
_inside = [(d, p) for d in CONFUSABLE_DISTRACTORS for p in _spoken if f" {p.lower()} " in f" {d.lower()} "]
if _inside or set(CONFUSABLE_DISTRACTORS) & set(EVAL_DISTRACTORS):
    raise RuntimeError(f"a confusable distractor contains a command phrase or is held out: {_inside[:3]}")
if set(EVENT_REPLIES) != set(SOUND_EVENTS):
    raise RuntimeError("every synthesised sound event needs a reply and vice versa")
