"""Training: state and optimizer, pure steps, and the loop. `pjlm.train.run(config, workdir)` runs
one phase from Python exactly as `pjlm train` does from the shell."""


def run(config, workdir, *, allow_config_change: bool = False, rewards=()):
    """Run one phase in `workdir` (resuming from its newest intact checkpoint); see
    `pjlm.train.loop.run`. Raises `pjlm.errors.Preempted` when stopped by a signal before the end.

    PPO only: `rewards` adds reward components beside `ppo.rewards`' — each a function of
    (prompts, responses) → one score per response, a `pjlm.rewards.RewardFn`, or either as
    (item, weight) — to the weighted sum (weight 1.0 by default); each is logged under its name.
    They are code, not config: pass the same ones when resuming."""
    if config.train.phase == "ppo":
        from pjlm.train.ppo import run as _ppo

        return _ppo(config, workdir, allow_config_change=allow_config_change, rewards=rewards)
    if rewards:
        from pjlm.errors import ConfigError

        raise ConfigError(f"rewards=[...] are PPO reward components; train.phase={config.train.phase} takes none")
    from pjlm.train.loop import run as _run

    return _run(config, workdir, allow_config_change=allow_config_change)
