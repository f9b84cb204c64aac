"""User workflows built on attribution: triage, leak search, what-if, counterfactual checks."""
