"""pjlm: language-model training in JAX/Flax — pre-training, SFT, reward models, PPO and DPO.

Importing pjlm does no work: modules are imported where they are used (`pjlm.model`, `pjlm.ops`, …).
"""

__version__ = "0.1.0"
