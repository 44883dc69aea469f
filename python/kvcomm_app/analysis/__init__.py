"""Post-processors of results already written: they read `kvcomm eval --records`, sweep
files or results/quality/fidelity.json and run no model. Their command lines are the thin
scripts in benchmarks/ (fidelity_table: `python -m kvcomm_app.analysis.fidelity_table`).

    eval_subset.py        an eval's summary over its first N questions, or over runs pooled
    merge_sweeps.py       sweeps over disjoint parts of one grid, as one file
    fidelity_table.py     markdown tables of results/quality/fidelity.json
    share_decisions.py    the numbers behind the pool's share-or-anchor decisions of a run
    entropy_fallbacks.py  how the calls the entropy threshold would send to new anchors agree with dense
    summary.py            writing a summary with its sources and provenance
"""
