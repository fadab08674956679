"""Evaluation of a trained CLT: measurements (`metrics`), the CLT-vs-PLT comparison (`comparison`),
figures (`plots`) and the assembled report (`report.evaluate_clt`, `cltvit-eval`)."""
