"""Every file and folder a run writes at the top of its ``output_dir``, named once. Inside a checkpoint, the names
are sftdist.checkpoint's."""

METRICS_FILE = "metrics.jsonl"  # one JSON line per logged step (sftdist.metrics.trackers)
PROBES_FILE = "probes.jsonl"  # the probes' answers at each eval
CONFIG_FILE = "config.yaml"  # the resolved config of the run
DATA_REPORT_FILE = "data_report.json"  # what the data pipeline read, kept, rejected, filtered and truncated
STOPPED_FILE = "stopped.json"  # written when a stop signal ended the run (sftdist.signals)
CHECKPOINTS_DIR = "checkpoints"  # step_N/ each (sftdist.checkpoint)
FINAL_DIR = "final"  # the exported Hugging Face model
