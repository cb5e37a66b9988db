"""StaySafe: study and prevent safety degradation during fine-tuning of chat models.

Where things are:
- ``staysafe.trainer``: ``SafetyConfig`` + ``SafetyTrainer`` (the adaptive KL regulariser, a transformers Trainer);
- ``staysafe.risk``, ``staysafe.probe``, ``staysafe.judges``: the risk estimators;
- ``staysafe.traces``: the run-directory format and its reader (``load_run``, ``list_runs``);
- ``staysafe.evaluation``: ASR and utility over training; ``staysafe.experiment``: methods compared;
- ``staysafe.models`` / ``staysafe.align``: model loading and the aligned default reference;
- ``staysafe.records``: records, shipped sets, scenarios (pure Python); ``staysafe.data``: their tokenisation;
- ``staysafe.methods``: the registry of fine-tuning methods (one ``Method`` and its hooks each);
- ``staysafe.runner`` / ``staysafe.cli``: one run, the CLI; ``staysafe.trace_names``: the metric column names;
- ``staysafe.files`` (reading untrusted files), ``staysafe.endpoint`` (where a judge's key may go: the command line
  only), ``staysafe.process`` (liveness by lock, never by a pid from a file).
"""

__version__ = "0.1.0"

from staysafe.traces import list_runs, load_run  # noqa: E402

__all__ = ["__version__", "list_runs", "load_run"]
