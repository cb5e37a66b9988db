"""StaySafe: study and prevent safety degradation during fine-tuning of chat models.

Where things are:
- ``staysafe.trainer``: ``SafetyConfig`` + ``SafetyTrainer`` (the adaptive KL regulariser, a transformers Trainer);
- ``staysafe.risk``, ``staysafe.probe``, ``staysafe.judges``: the risk estimators;
- ``staysafe.runs.traces``: the run-directory format and its reader (``load_run``, ``list_runs``);
- ``staysafe.eval.evaluation``: ASR and utility over training; ``staysafe.experiment``: methods compared;
- ``staysafe.models.loading`` / ``staysafe.models.align``: model loading and the aligned default reference;
- ``staysafe.records``: records, shipped sets, scenarios (pure Python); ``staysafe.data``: their tokenisation;
- ``staysafe.methods``: the registry of fine-tuning methods (one ``Method`` and its hooks each);
- ``staysafe.runner`` / ``staysafe.cli``: one run, the CLI; ``staysafe.runs.trace_names``: the metric column names;
- ``staysafe.runs.files`` (reading untrusted files), ``staysafe.judges.endpoint`` (where a judge's key may go: the
  command line only), ``staysafe.runs.process`` (liveness by lock, never by a pid from a file);
- the edges in folders: ``defenses/`` (Lisa, Vaccine, Safe LoRA), ``models/`` (loading, the embedded and aligned
  models, the alignment build), ``runs/`` (the trace format and its files), ``eval/`` (ASR, intervals, judges'
  validation, the frontier, the task).
"""

__version__ = "0.1.0"

from staysafe.runs.traces import list_runs, load_run  # noqa: E402

__all__ = ["__version__", "list_runs", "load_run"]
