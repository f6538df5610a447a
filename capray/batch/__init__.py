"""The bulk job: Ray Data stages (`capray.batch.stages`) chained into a processor (`build_processor`),
and `capray protect`, a sweep over the library feeding the same processor slice by slice (`capray.batch.command`)."""

from __future__ import annotations

__all__ = ["Processor", "build_processor"]


def __getattr__(name: str):  # lazy: `capray --help` imports the command modules, not pyarrow and the stages
    if name in __all__:
        from capray.batch import processor

        return getattr(processor, name)
    raise AttributeError(name)
