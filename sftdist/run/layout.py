"""Every file and folder a run writes, named once: at the top of its ``output_dir``, and inside each checkpoint
(``checkpoints/step_N/``, written by sftdist.run.checkpoint)."""

METRICS_FILE = "metrics.jsonl"  # one JSON line per logged step (sftdist.metrics.trackers)
PROBES_FILE = "probes.jsonl"  # the probes' answers at each eval
CONFIG_FILE = "config.yaml"  # the resolved config of the run
DATA_REPORT_FILE = "data_report.json"  # what the data pipeline read, kept, rejected, filtered and truncated
STOPPED_FILE = "stopped.json"  # written when a stop signal ended the run (sftdist.run.signals)
LOCK_FILE = ".sftdist.lock"  # held by the run that uses output_dir (sftdist.run.lock): its host, process, job
CHECKPOINTS_DIR = "checkpoints"  # step_N/ each (sftdist.run.checkpoint)
FINAL_DIR = "final"  # the exported Hugging Face model
MERGED_SUFFIX = "_merged"  # LoRA: final_merged/, the base with the adapter merged in (OUT_merged for sftdist-export)
TRAINING_INFO = "sftdist_training.json"  # in final/ and each checkpoint's hf/: template, data, version

# inside checkpoints/step_N/
MARKER = "COMPLETE"  # written last, listing every file and its size: a directory without it is torn
STATE_FILE = "trainer_state.json"  # sftdist.run.state.TrainerState
STATE_DIR = "state"  # model and optimizer, in the strategy's format
HF_DIR = "hf"  # what an export needs besides the weights
RNG_DIR = "rng"  # rank_R.json: each rank's RNG states
CURRICULUM_FILE = "curriculum_buckets.npy"  # the difficulty bucket of every prepared sample (rank 0)
