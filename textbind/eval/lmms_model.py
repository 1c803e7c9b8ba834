"""The lmms-eval model class of textbind (imports lmms-eval; the adapter itself is `textbind.eval.lmms`)."""

from __future__ import annotations

import argparse
from typing import Any

from lmms_eval.api.model import lmms
from tqdm import tqdm

from textbind.eval.lmms import LmmsAnswerer
from textbind.runtime import (
    add_generation_arguments,
    add_setup_arguments,
    build_generator,
    generation_config_from_arguments,
    setup_from_arguments,
)


def _flags(options: dict[str, Any]) -> list[str]:
    argv = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is not False and value is not None:
            argv += [flag, str(value)]
    return argv


class TextBindLMMs(lmms):
    """lmms-eval `--model textbind`; model_args are textbind's setup and generation flags (underscored)."""

    is_simple = True

    def __init__(self, output_dir: str = "lmms_eval_textbind_images", batch_size: int | str = 1,
                 **options: Any) -> None:
        super().__init__()
        if int(batch_size) != 1:
            raise ValueError("textbind answers one request at a time: use --batch_size 1")
        parser = argparse.ArgumentParser(prog="lmms-eval --model textbind", add_help=False, exit_on_error=False)
        add_setup_arguments(parser)
        add_generation_arguments(parser)
        try:
            args = parser.parse_args(_flags(options))
        except (argparse.ArgumentError, SystemExit) as error:
            raise ValueError(f"textbind model_args {sorted(options)}: {error}") from error
        self.answerer = LmmsAnswerer(build_generator(setup_from_arguments(args)),
                                     generation_config_from_arguments(args), output_dir)

    def generate_until(self, requests: list[Any]) -> list[str]:
        answers = []
        for request in tqdm(requests, desc="textbind", disable=self.rank != 0):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual else []
            answers.append(self.answerer.answer(context, visuals, gen_kwargs, f"{task}_{split}_{doc_id}"))
        return answers

    def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
        raise NotImplementedError("textbind answers generation tasks (generate_until) only")

    def generate_until_multi_round(self, requests: list[Any]) -> list[str]:
        raise NotImplementedError("textbind answers single-round generation tasks only")
