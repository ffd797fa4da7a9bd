"""The team: experts, their heads, fusion and cascade as one object, trained in stages and saved as a folder.

    config.py      TeamConfig and its parts: one dataclass tree, checked on creation
    team.py        Team: inference through the cascade (and gated mode), to and from a checkpoint's state
    training.py    staged training (stages 1-3 and the threshold search): train_team, fit
    cascade.py     confidence, threshold search, the accuracy-vs-FLOPs curve
    composition.py which tiers run, what each serves, where rows stop: chosen on held-apart rows
    costs.py       FLOPs per row of an encoder tier and of a head
    finetune.py    training one expert (LoRA, top-k layers, full) with its own head: the hand-written backward
    adaptation.py  the team's adaptation stage: AdaptSettings, adapt, load_delta
    checkpoint.py  the folder format: safetensors + JSON, checksummed, swapped in atomically
"""
from minislm.team.checkpoint import CheckpointError
from minislm.team.config import LexicalSettings, TeamConfig
from minislm.team.team import Team
from minislm.team.training import train_team

__all__ = ["CheckpointError", "LexicalSettings", "Team", "TeamConfig", "train_team"]
