"""The built-in demo task: telecom glossary QA and arithmetic word problems, generated with no download.

Two kinds of question-answer pairs, both deterministic given a seed:

- glossary: "What does RAN stand for?" -> "RAN stands for Radio Access Network.", and "What is a RAN in telecom?" ->
  a one-line definition the project wrote itself (`GLOSSARY` below). Each fact is asked in four phrasings; the test
  split asks every fact in the one phrasing its training rows lack, and which phrasing is held out rotates over the
  facts, so every phrasing is seen in training (with other facts) and the test asks known facts in known words
  recombined, not words never seen;
- arithmetic: short telecom-flavoured word problems on small numbers (operands up to 30, divisors and quotients up to
  9) whose answers carry a reasoning chain and end with "The answer is N." (so that exact match of the final answer
  can be scored). The test split's problems are never in train, but their sums and products are learnable from it.
"""

from __future__ import annotations

import random

from datasets import Dataset, DatasetDict

# (acronym, expansion, definition). Definitions are the project's own one-liners.
GLOSSARY: list[tuple[str, str, str]] = [
    ("RAN", "Radio Access Network", "the part of a mobile network that connects devices to the core over radio"),
    ("UE", "User Equipment", "any device a subscriber uses to reach the mobile network"),
    ("eNB", "Evolved Node B", "the LTE base station that handles radio links with user devices"),
    ("gNB", "Next Generation Node B", "the 5G base station that serves devices over the new radio interface"),
    ("AMF", "Access and Mobility Management Function", "the 5G core function that handles registration and mobility"),
    ("SMF", "Session Management Function", "the 5G core function that sets up and manages data sessions"),
    ("UPF", "User Plane Function", "the 5G core function that forwards user data packets"),
    ("MME", "Mobility Management Entity", "the LTE core node that tracks devices and handles signalling"),
    ("HSS", "Home Subscriber Server", "the database that stores subscriber profiles and credentials"),
    ("SIM", "Subscriber Identity Module", "the card that stores the keys identifying a subscriber"),
    ("IMSI", "International Mobile Subscriber Identity", "the unique number that identifies a subscriber"),
    ("QoS", "Quality of Service", "the set of guarantees on delay, loss and rate given to a traffic flow"),
    ("MIMO", "Multiple Input Multiple Output", "the use of many antennas to send several data streams at once"),
    ("OFDM", "Orthogonal Frequency Division Multiplexing", "a modulation that splits data over many narrow carriers"),
    ("TDD", "Time Division Duplex", "a scheme where uplink and downlink share a band in turns"),
    ("FDD", "Frequency Division Duplex", "a scheme where uplink and downlink use separate bands"),
    ("LTE", "Long Term Evolution", "the fourth generation standard for mobile broadband"),
    ("NR", "New Radio", "the radio interface defined for fifth generation networks"),
    ("SINR", "Signal to Interference plus Noise Ratio", "a measure of how clean a received signal is"),
    ("RSRP", "Reference Signal Received Power", "the average power of the reference signals a device measures"),
    ("HARQ", "Hybrid Automatic Repeat Request", "a retransmission scheme that combines error coding with resends"),
    ("RRC", "Radio Resource Control", "the protocol that sets up and releases radio connections"),
    ("PDCP", "Packet Data Convergence Protocol", "the layer that compresses headers and ciphers user data"),
    ("RLC", "Radio Link Control", "the layer that segments packets and recovers lost ones"),
    ("MAC", "Medium Access Control", "the layer that schedules radio resources between devices"),
    ("VoLTE", "Voice over LTE", "a service that carries voice calls as packets over LTE"),
    ("IMS", "IP Multimedia Subsystem", "the core framework that delivers voice and video over IP"),
    ("SDN", "Software Defined Networking", "an approach that separates network control from packet forwarding"),
    ("NFV", "Network Functions Virtualisation", "running network functions as software on shared servers"),
    ("MEC", "Multi-access Edge Computing", "placing compute resources close to the radio network"),
    ("URLLC", "Ultra Reliable Low Latency Communication", "a 5G service class for critical low delay traffic"),
    ("eMBB", "Enhanced Mobile Broadband", "a 5G service class for high data rates"),
    ("mMTC", "Massive Machine Type Communication", "a 5G service class for very many low power devices"),
    ("BWP", "Bandwidth Part", "a subset of a carrier that a 5G device is configured to use"),
    ("CQI", "Channel Quality Indicator", "a report from the device that tells the base station how good the channel is"),
    ("PRB", "Physical Resource Block", "the smallest unit of frequency and time the scheduler assigns"),
    ("TTI", "Transmission Time Interval", "the duration of one scheduled transmission"),
    ("DRX", "Discontinuous Reception", "a mode that lets a device sleep between paging checks to save power"),
    ("PCI", "Physical Cell Identity", "the number that distinguishes neighbouring cells on the radio layer"),
    ("APN", "Access Point Name", "the name that selects the packet network a device connects to"),
    ("SON", "Self Organising Network", "automation that configures and optimises cells without manual work"),
    ("CoMP", "Coordinated Multi Point", "cooperation between cells to improve service at the cell edge"),
    ("DSS", "Dynamic Spectrum Sharing", "running LTE and 5G on the same carrier at the same time"),
    ("O-RAN", "Open Radio Access Network", "an architecture with open interfaces between radio network parts"),
    ("RIC", "RAN Intelligent Controller", "the O-RAN component that hosts control applications for the radio network"),
    ("NSA", "Non Standalone", "a 5G deployment that relies on an LTE core and anchor"),
    ("SA", "Standalone", "a 5G deployment with its own 5G core"),
    ("KPI", "Key Performance Indicator", "a measured value used to judge how well the network performs"),
    ("BLER", "Block Error Rate", "the share of transport blocks received with errors"),
    ("EIRP", "Effective Isotropic Radiated Power", "the power an antenna would need to radiate equally in all directions"),
    ("VSWR", "Voltage Standing Wave Ratio", "a measure of how well an antenna feed is matched"),
    ("RRU", "Remote Radio Unit", "the radio hardware mounted near the antenna"),
    ("BBU", "Baseband Unit", "the unit that processes baseband signals for a base station"),
    ("CPRI", "Common Public Radio Interface", "the link between a baseband unit and its radio units"),
    ("GTP", "GPRS Tunnelling Protocol", "the protocol that carries user data tunnels in the mobile core"),
    ("PCRF", "Policy and Charging Rules Function", "the node that decides policy and charging rules for sessions"),
    ("PCF", "Policy Control Function", "the 5G core function that provides policy rules"),
    ("NSSAI", "Network Slice Selection Assistance Information", "the identifiers a device uses to select slices"),
    ("SLA", "Service Level Agreement", "a contract that fixes the service quality a customer is promised"),
    ("FWA", "Fixed Wireless Access", "home broadband delivered over a mobile radio link"),
]

_ACRONYM_QUESTIONS = [
    "What does {a} stand for?",
    "Expand the acronym {a}.",
    "In telecom, what is the full form of {a}?",
    "What is {a} short for?",
]
_DEFINITION_QUESTIONS = [
    "What is {a} in telecom?",
    "Define {a}.",
    "Explain what {a} means in a mobile network.",
    "Briefly, what is the {a}?",
]

# (template, answer builder). Each builder returns (reasoning, final answer) from the drawn numbers.
_ARITHMETIC = [
    ("A cell serves {x} users per minute. How many users does it serve in {y} minutes?",
     lambda x, y: (f"{x} users per minute for {y} minutes is {x} * {y} = {x * y}.", x * y)),
    ("A site has {x} antennas and {y} more are installed. How many antennas does it have now?",
     lambda x, y: (f"It had {x} and gained {y}, so {x} + {y} = {x + y}.", x + y)),
    ("A link carries {x} megabits and {y} megabits are lost. How many megabits arrive?",
     lambda x, y: (f"{x} sent minus {y} lost is {x} - {y} = {x - y}.", x - y)),
    ("An operator splits {p} subscribers evenly over {y} cells. How many subscribers per cell?",
     lambda p, y: (f"{p} subscribers over {y} cells is {p} / {y} = {p // y}.", p // y)),
    ("A tower has {x} sectors with {y} carriers each. How many carriers in total?",
     lambda x, y: (f"{x} sectors times {y} carriers is {x} * {y} = {x * y}.", x * y)),
    ("A phone uses {x} units of data in the morning and {y} in the evening. How many units in total?",
     lambda x, y: (f"Morning {x} plus evening {y} is {x} + {y} = {x + y}.", x + y)),
]


def _glossary_pairs() -> tuple[list[dict], list[dict]]:
    """`(train, test)`: fact i is tested in acronym phrasing `i % 4` (and the definition phrasing paired with it) and
    trained in the other three."""
    train, test = [], []
    for i, (acronym, expansion, definition) in enumerate(GLOSSARY):
        for index in range(len(_ACRONYM_QUESTIONS)):
            rows = [{"prompt": _ACRONYM_QUESTIONS[index].format(a=acronym),
                     "completion": f"{acronym} stands for {expansion}.", "kind": "glossary", "answer": expansion},
                    {"prompt": _DEFINITION_QUESTIONS[(index + 1) % len(_DEFINITION_QUESTIONS)].format(a=acronym),
                     "completion": f"{acronym} is {definition}.", "kind": "glossary", "answer": definition}]
            (test if index == i % len(_ACRONYM_QUESTIONS) else train).extend(rows)
    return train, test


def _arithmetic_pairs(rng: random.Random, count: int, seen: set[str]) -> list[dict]:
    pairs = []
    while len(pairs) < count:
        template, build = rng.choice(_ARITHMETIC)
        y = rng.randint(2, 9)
        x = rng.randint(y + 1, 30)
        # The division template draws an exact multiple, so the answer is a whole number.
        values = {"x": x, "y": y, "p": y * rng.randint(2, 9)}
        first = values["p"] if "{p}" in template else x
        prompt = template.format(**values)
        if prompt in seen:
            continue
        seen.add(prompt)
        reasoning, answer = build(first, y)
        pairs.append({"prompt": prompt, "completion": f"{reasoning} The answer is {answer}.",
                      "kind": "arithmetic", "answer": str(answer)})
    return pairs


def demo_pairs(seed: int = 0, num_arithmetic_train: int = 600, num_arithmetic_test: int = 60
               ) -> dict[str, list[dict]]:
    """The demo task as plain rows `{prompt, completion, kind, answer}`, split into train and test, shuffled.

    Glossary: 6 training rows and 2 test rows per fact (see the module docstring). Arithmetic: distinct problems, none
    shared between the splits.
    """
    rng = random.Random(seed)
    seen: set[str] = set()
    glossary_train, glossary_test = _glossary_pairs()
    train = glossary_train + _arithmetic_pairs(rng, num_arithmetic_train, seen)
    test = glossary_test + _arithmetic_pairs(rng, num_arithmetic_test, seen)
    rng.shuffle(train)
    rng.shuffle(test)
    return {"train": train, "test": test}


def demo_domain_text(seed: int = 0) -> list[str]:
    """Unlabelled text of the demo's domain, for pretraining a "base" model that knows its language: each glossary
    fact as prose ("RAN stands for Radio Access Network. RAN is the part of ..."), and the reasoning of each training
    arithmetic problem as a sentence ("12 sent minus 4 lost is 12 - 4 = 8."), with no question and no answer to one
    (no test problem, no question phrasing), shuffled."""
    rng = random.Random(seed)
    facts = [f"{acronym} stands for {expansion}. {acronym} is {definition}."
             for acronym, expansion, definition in GLOSSARY]
    reasoning = [row["completion"].split(" The answer is")[0] for row in demo_pairs(seed=seed)["train"]
                 if row["kind"] == "arithmetic"]
    texts = facts + reasoning
    rng.shuffle(texts)
    return texts


def load_demo_dataset(format: str = "prompt_completion", seed: int = 0, **sizes) -> DatasetDict:
    """The demo task as a `DatasetDict` with `train` and `test`, in a format `SFTTrainer` accepts.

    Args:
        format: `"prompt_completion"` (columns `prompt`, `completion`), `"messages"` (conversational `messages`:
            a user turn and an assistant turn), `"conversational_prompt_completion"` (`prompt` and `completion` as
            message lists), `"text"` (one `text` column, question and answer joined; SFT trains on all of it) or
            `"domain_text"` (train: the domain's prose, no question/answer pairs, `demo_domain_text`, for pretraining
            the telecom study's base models; test: the task's prompt/completion test split, to score them on).
        seed: the generator's seed.
        sizes: `num_arithmetic_train`, `num_arithmetic_test`.
    Each row also keeps `kind` (glossary or arithmetic) and `answer` (the final answer, for exact match).
    """
    splits = demo_pairs(seed=seed, **sizes)
    if format == "domain_text":  # train: prose, no questions or answers; test: the task's, to score the model on
        test = load_demo_dataset("prompt_completion", seed, **sizes)["test"]
        return DatasetDict({"train": Dataset.from_list([{"text": text} for text in demo_domain_text(seed)]),
                            "test": test})

    def convert(row: dict) -> dict:
        extra = {"kind": row["kind"], "answer": row["answer"]}
        user = {"role": "user", "content": row["prompt"]}
        assistant = {"role": "assistant", "content": row["completion"]}
        if format == "prompt_completion":
            return {"prompt": row["prompt"], "completion": " " + row["completion"], **extra}
        if format == "messages":
            return {"messages": [user, assistant], **extra}
        if format == "conversational_prompt_completion":
            return {"prompt": [user], "completion": [assistant], **extra}
        if format == "text":
            return {"text": f"{row['prompt']} {row['completion']}", **extra}
        raise ValueError(f"Unknown demo dataset format {format!r}; use prompt_completion, messages, "
                         "conversational_prompt_completion, text or domain_text.")

    return DatasetDict({name: Dataset.from_list([convert(row) for row in rows]) for name, rows in splits.items()})


def demo_corpus(seed: int = 0) -> list[str]:
    """Every question and answer of the train split, for training the demo tokenizers."""
    rows = demo_pairs(seed=seed)["train"]
    return [row["prompt"] for row in rows] + [row["completion"] for row in rows]
