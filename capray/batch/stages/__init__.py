"""The bulk job's stages, one module each, every one a picklable callable on a pyarrow batch whose
rows are identities (`capray.batch.rows`), sharing one error contract (`base.Stage`):

    (sweep →) check → decode → protect → write → commit

`capray.batch.build_processor` chains check..commit into a processor a platform applies to a Ray
Dataset it already has; `capray protect` feeds it the slices of its sweep (`capray/batch/sweep.py`).
"""

from capray.batch.stages.base import Stage
from capray.batch.stages.check import CheckStage
from capray.batch.stages.commit import CommitStage
from capray.batch.stages.decode import DecodeStage
from capray.batch.stages.protect import ProtectStage
from capray.batch.stages.write import WriteStage

__all__ = ["Stage", "CheckStage", "DecodeStage", "ProtectStage", "WriteStage", "CommitStage"]
