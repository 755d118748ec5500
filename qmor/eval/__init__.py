"""`qmor eval`: what a run learnt and what it kept, before and after, and whether its exports behave like it.

    items.py      the examples scored: the run's validation split (or its training data), or another dataset
    generate.py   greedy replies from token ids, and where each one stopped
    general.py    the built-in general questions (general.json) that measure forgetting
    stops.py      the end-of-turn token a chat template ends a reply with; what an export stops on
    exports.py    finding a run's exports and loading them as a user would
    agreement.py  top-1 agreement and KL of an export against the adapter, on the same tokens
    runner.py     one run (or several) evaluated, with progress
    report.py     eval.json and eval.md; the comparison of several runs
    plot.py       eval.png and the comparison plot
"""
