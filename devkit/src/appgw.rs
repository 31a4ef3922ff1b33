//! Application Gateway rewrite-rule evaluator (work in progress).
