"""Tests for the transcript filters: one crafted transcript per rule, the report's counts, the command line."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from textbind.datagen.filters import RULE_NAMES, FilterConfig, caption_distance, filter_records

REPOSITORY = Path(__file__).resolve().parents[2]
CAPTIONS = ["a red circle on the left", "a large blue square"]
GOOD = (
    "Human: What is in <img0>a red circle on the left</img0>?\n"
    "Assistant: It is a red circle. Here is a related one: <img1>a large blue square</img1>\n"
    "Human: Nice, thanks.\n"
    "Assistant: You are welcome."
)

# rule -> a transcript that passes every earlier rule and fails this one.
FAULTY = {
    "repeated_image_tag": "Human: <img0>a red circle on the left</img0> or <img0>a red circle on the left</img0>?\n"
                          "Assistant: The first.\nHuman: Why?\nAssistant: It is red.",
    "image_index_out_of_range": "Human: Compare <img0>a red circle on the left</img0> and <img2>a cat</img2>.\n"
                                "Assistant: Different.\nHuman: How?\nAssistant: Shapes.",
    "no_image": "Human: Tell me about circles.\nAssistant: They are round.\nHuman: And squares?\n"
                "Assistant: They have corners.",
    "no_human_turn": "Assistant: Look: <img0>a red circle on the left</img0>\nAssistant: Nice.\nAssistant: Bye.",
    "roles_not_alternating": "Human: Look at <img0>a red circle on the left</img0>.\nHuman: Well?\n"
                             "Assistant: A circle.",
    "too_few_utterances": "Human: Draw <img0>a red circle on the left</img0> for me.\nAssistant: Done.",
    "caption_mismatch": "Human: What is in <img0>a green triangle at the top</img0>?\nAssistant: A triangle.\n"
                        "Human: Thanks.\nAssistant: You are welcome.",
    "refusal": "Human: What is in <img0>a red circle on the left</img0>?\n"
               "Assistant: I'm sorry, but as an AI I cannot see images.\nHuman: Try.\nAssistant: No.",
}


def raw(response: str, identifier: str = "r0", captions: list[str] = CAPTIONS) -> dict:
    images = [{"key": f"k{index}", "caption": caption, "image": f"{index}.png"}
              for index, caption in enumerate(captions)]
    return {"id": identifier, "images": images, "response": response, "usage": {"total_tokens": 10}}


def counts_except(report: dict, rule: str | None) -> dict:
    return {name: count for name, count in report["counts"].items() if name != rule}


def test_a_good_transcript_is_kept_with_its_turns():
    result = filter_records([raw(GOOD)])
    assert result.rejected == [] and len(result.kept) == 1
    assert result.kept[0]["turns"] == [
        {"role": "user", "content": "What is in <img0>a red circle on the left</img0>?"},
        {"role": "assistant", "content": "It is a red circle. Here is a related one: <img1>a large blue square</img1>"},
        {"role": "user", "content": "Nice, thanks."},
        {"role": "assistant", "content": "You are welcome."},
    ]
    assert result.kept[0]["usage"] == {"total_tokens": 10}  # the raw record travels along
    assert set(result.report["counts"].values()) == {0}
    assert [row["rule"] for row in result.report["rules"]] == RULE_NAMES


@pytest.mark.parametrize("rule", list(FAULTY))
def test_each_rule_rejects_its_transcript_and_can_be_switched_off(rule):
    result = filter_records([raw(GOOD, "good"), raw(FAULTY[rule], "bad")])
    assert [record["id"] for record in result.kept] == ["good"]
    (rejected,) = result.rejected
    assert rejected["id"] == "bad" and rejected["rejected_by"] == rule and rejected["reason"]
    assert result.report["counts"][rule] == 1
    assert set(counts_except(result.report, rule).values()) == {0}
    assert (result.report["input"], result.report["kept"], result.report["rejected"]) == (2, 1, 1)

    switched_off = filter_records([raw(FAULTY[rule])], replace(FilterConfig(), **{rule: False}))
    assert all(record.get("rejected_by") != rule for record in switched_off.rejected)
    assert switched_off.report["counts"][rule] == 0


def test_mixed_roles_inside_an_utterance_are_rejected():
    transcript = ("Human: Look at <img0>a red circle on the left</img0>. Assistant: I see it.\n"
                  "Assistant: A circle.\nHuman: Thanks.\nAssistant: Welcome.")
    (rejected,) = filter_records([raw(transcript)]).rejected
    assert rejected["rejected_by"] == "roles_not_alternating" and "Assistant:" in rejected["reason"]


def test_an_empty_answer_is_a_refusal():
    transcript = "Human: What is <img0>a red circle on the left</img0>?\nAssistant:\nHuman: Hello?\nAssistant: Yes."
    (rejected,) = filter_records([raw(transcript)]).rejected
    assert rejected["rejected_by"] == "refusal" and "empty" in rejected["reason"]


def test_a_duplicate_response_is_rejected_after_the_first():
    result = filter_records([raw(GOOD, "first"), raw(GOOD, "second"), raw(GOOD, "third")])
    assert [record["id"] for record in result.kept] == ["first"]
    assert [record["rejected_by"] for record in result.rejected] == ["duplicate_response"] * 2
    assert result.report["counts"]["duplicate_response"] == 2


def test_an_unclosed_tag_is_cleaned_not_rejected():
    transcript = ("Human: What is in <img0>a red circle on the left</img0>?\n"
                  "Assistant: A circle, like <img1 this one.\nHuman: And <img1>?\nAssistant: It is</img0> round.")
    result = filter_records([raw(transcript)])
    (kept,) = result.kept
    contents = [turn["content"] for turn in kept["turns"]]
    assert contents[0] == "What is in <img0>a red circle on the left</img0>?"
    assert contents[1] == "A circle, like <img1 this one."  # not a tag: no closing '>'
    assert contents[2] == "And ?"
    assert contents[3] == "It is round."  # a closing tag without its opening goes too
    assert result.report["counts"]["unclosed_image_tag"] == 1  # records cleaned
    assert result.report["cleaned"]["unclosed_image_tags_removed"] == 2
    assert result.report["rejected"] == 0
    # Switched off, the tags stay (the caption and refusal rules still run).
    (kept,) = filter_records([raw(transcript)], FilterConfig(unclosed_image_tag=False)).kept
    assert kept["turns"][2]["content"] == "And <img1>?"


def test_caption_distance_threshold_is_inclusive_and_relative_to_the_original():
    original = "a red circle on the left"  # 24 characters: 2 edits = 0.083, 3 edits = 0.125
    assert caption_distance("a red circle on the lefx", original) == pytest.approx(1 / 24)
    two_edits = "a rex circle on the lefx"
    three_edits = "a rex circle on thx lefx"
    for quoted, kept in ((two_edits, True), (three_edits, False), ("  " + original + " ", True)):
        transcript = GOOD.replace("<img0>a red circle on the left</img0>", f"<img0>{quoted}</img0>")
        result = filter_records([raw(transcript)])
        assert bool(result.kept) is kept, quoted
    exactly = FilterConfig(max_caption_distance=3 / 24)
    transcript = GOOD.replace("<img0>a red circle on the left</img0>", f"<img0>{three_edits}</img0>")
    assert filter_records([raw(transcript)], exactly).kept


def test_a_trailing_question_is_dropped_so_the_conversation_ends_with_an_answer():
    transcript = GOOD + "\nHuman: One more?"
    (kept,) = filter_records([raw(transcript)]).kept
    assert [turn["role"] for turn in kept["turns"]] == ["user", "assistant", "user", "assistant"]


def test_rules_run_in_order_first_failure_wins():
    # Repeated tag AND index out of range AND refusal: the earliest rule is reported.
    transcript = ("Human: <img0>a red circle on the left</img0> <img0>x</img0> <img5>y</img5>\n"
                  "Assistant: I'm sorry.\nHuman: ok\nAssistant: ok")
    (rejected,) = filter_records([raw(transcript)]).rejected
    assert rejected["rejected_by"] == "repeated_image_tag"
    config = FilterConfig(repeated_image_tag=False)
    (rejected,) = filter_records([raw(transcript)], config).rejected
    assert rejected["rejected_by"] == "image_index_out_of_range"


def test_command_line_filters_a_file_with_malformed_lines(tmp_path):
    lines = [json.dumps(raw(GOOD, "good")), "{not json", json.dumps({"id": "no-response", "images": []}),
             "", json.dumps(raw(FAULTY["refusal"], "refusal")), json.dumps(raw(FAULTY["caption_mismatch"], "far"))]
    raw_path = tmp_path / "raw.jsonl"
    raw_path.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    command = [sys.executable, "-m", "textbind", "datagen", "filter", "--input", str(raw_path), "--out", str(out),
               "filter.caption_mismatch=false"]
    completed = subprocess.run(command, cwd=REPOSITORY, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    assert f"{raw_path} line 2: not valid JSON" in completed.stderr
    assert f"{raw_path} line 3: field 'response'" in completed.stderr
    table = completed.stdout
    assert table.index("repeated_image_tag") < table.index("refusal")  # printed in rule order
    assert "caption_mismatch" in table and "off" in table

    kept = [json.loads(line) for line in (out / "filtered.jsonl").read_text().splitlines()]
    rejected = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    report = json.loads((out / "filter_report.json").read_text())
    assert [record["id"] for record in kept] == ["good", "far"]  # caption rule switched off
    assert [entry["rejected_by"] for entry in rejected] == ["malformed", "malformed", "refusal"]
    assert rejected[0]["text"] == "{not json" and rejected[1]["record"]["id"] == "no-response"
    assert (report["input"], report["kept"], report["rejected"], report["malformed"]) == (5, 2, 3, 2)
    assert report["counts"]["refusal"] == 1 and list(report["counts"]) == RULE_NAMES
    assert report["config"]["caption_mismatch"] is False

    bad = subprocess.run(command[:-1] + ["filter.max_caption_distance=oops"], cwd=REPOSITORY, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and "max_caption_distance" in bad.stderr
