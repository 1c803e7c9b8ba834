"""Options of the evaluation harness: the `eval` config section, set with `eval.key=value` on the command line."""

from __future__ import annotations

from dataclasses import dataclass, field

from textbind.config import ConfigError


@dataclass
class EvalConfig:
    """Benchmark and metric options."""

    turns: str = "last"  # TextBindEval: which assistant turns to generate, last | all
    image_dir: str = ""  # TextBindEval: image directory for records without their own image_dir
    clip_model: str = ""  # local CLIP directory (CLIPModel + processor); empty: no CLIP similarity
    bertscore_model: str = ""  # local BERT-style model directory for BERTScore; empty: no BERTScore
    bertscore_layers: int = 0  # hidden layer BERTScore reads; 0: the model's last layer
    metrics_device: str = "cpu"  # where CLIP and BERTScore run
    bootstrap_seed: int = 0  # seed of the 95% bootstrap intervals
    circular: bool = True  # MMBench: CircularEval (every rotation of the options) where answers are known
    mmbench_instruction: str = "Answer with the option's letter from the given choices directly."
    mme_instruction: str = ""  # appended to MME questions (they already end with "Please answer yes or no.")
    report_samples: int = 8  # items shown side by side in report.html (plus the worst and best)
    report_metric: str = ""  # item score that ranks the worst and best items; empty: the benchmark's choice

    def validate(self) -> None:
        if self.turns not in ("last", "all"):
            raise ConfigError(f"eval.turns must be 'last' or 'all', got {self.turns!r}")
        if self.bertscore_layers < 0 or self.report_samples < 0:
            raise ConfigError("eval.bertscore_layers and eval.report_samples must not be negative")


@dataclass
class EvalRunConfig:
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> EvalRunConfig:
        self.eval.validate()
        return self
