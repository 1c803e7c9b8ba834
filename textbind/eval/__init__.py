"""The evaluation harness: benchmarks (TextBindEval, MME, MMBench, toy), their metrics, resumable runs and reports.

A benchmark yields `EvalItem`s (a conversation ending with a user turn, plus what its scorer needs);
`textbind.eval.harness.run_benchmark` answers each one with the generator, appends it to
`predictions.jsonl` as it goes, and asks the benchmark to score the predictions (`report.json`).
"""
