"""Running audits: the analyser actor, the Ray session, the audit with per-shard commits and
resume, scheduled re-analysis, and synthetic ImageNet-sized runs.

Rule: may import every wing below it (engine, inputs, storage, results); knows no LRP rule:
the actor hands batches to the engine's Analyzer.
"""
