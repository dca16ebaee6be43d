"""minillm: the companion library of the minillm course.

Each module is one idea, taught by one chapter: tokenizers and data (01), kernels (02), model and train
(03), moe (04), cost (00, used everywhere), grading and notebooks (the course machinery). Import what you need:

    from minillm.model import GPT, GPTConfig
    from minillm.train import train, TrainConfig
"""
__version__ = "0.1.0"


def notebook_setup(seed: int = 0, quiet: bool = False) -> dict:
    """Called by every chapter's first cell: seeds, plot style, one line about this machine."""
    from .notebooks import notebook_setup as setup
    return setup(seed=seed, quiet=quiet)


def __getattr__(name):
    # Submodules on first use (`minillm.cost`, `minillm.grading`, ...), so `import minillm` stays fast.
    import importlib
    if name.startswith("_"):
        raise AttributeError(name)
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as error:
        if error.name == f"{__name__}.{name}":
            raise AttributeError(f"module 'minillm' has no attribute or submodule {name!r}") from None
        raise
