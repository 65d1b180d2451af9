"""Training: state and optimizer, pure steps, and the loop. `pjlm.train.run(config, workdir)` runs
one phase from Python exactly as `pjlm train` does from the shell."""


def run(config, workdir):
    """Run one phase in `workdir` (resuming from its latest checkpoint); see `pjlm.train.loop.run`."""
    if config.train.phase == "ppo":
        from pjlm.train.ppo import run as _ppo

        return _ppo(config, workdir)
    from pjlm.train.loop import run as _run

    return _run(config, workdir)
