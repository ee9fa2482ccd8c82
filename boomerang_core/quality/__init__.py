"""How good a size is, and how the sizes are chosen: every module here scores plans on token blocks.

- :mod:`.scoring`: THE plan scorer. ``score_plans`` runs many plans sharing layer prefixes once
  (next-token NLL, and KL to a :class:`~.scoring.TeacherPass`); ``perplexities`` is its
  perplexity, ``perplexity`` that of one built model (the reference it is tested against).
- :mod:`.baselines`: what a size must beat: the undistilled plan and ShortGPT's dropped layers.
- :mod:`.klpatch`: the greedy KL patch order (one size per patched block).
- :mod:`.search`: the Pareto front over every plan the resident layers express (the demo family).
- :mod:`.curve`: a family's held-out perplexity curve with both baselines (``boomerang eval``).
- :mod:`.report`: the curve's result type, its verdicts, markdown report and PNG plot.
- :mod:`.chat`: chat KL (teacher || plan) per response token on teacher conversations, and the
  general text (a second perplexity domain).
- :mod:`.qa`: the shipped easy question set, its matching rule and greedy answers of plans.
- :mod:`.chateval`: chat KL, answer accuracy and both perplexities for the sizes, ShortGPT and the
  teacher in one run (the chat columns of ``boomerang eval``).
"""
