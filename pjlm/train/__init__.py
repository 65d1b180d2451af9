"""Training: state and optimizer, pure steps, and the loop. `pjlm.train.run(config, workdir)` runs
one phase from Python exactly as `pjlm train` does from the shell."""


def run(config, workdir, *, allow_config_change: bool = False):
    """Run one phase in `workdir` (resuming from its newest intact checkpoint); see
    `pjlm.train.loop.run`. Raises `pjlm.errors.Preempted` when stopped by a signal before the end."""
    if config.train.phase == "ppo":
        from pjlm.train.ppo import run as _ppo

        return _ppo(config, workdir, allow_config_change=allow_config_change)
    from pjlm.train.loop import run as _run

    return _run(config, workdir, allow_config_change=allow_config_change)
