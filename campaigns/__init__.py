"""Reliability campaigns (campaigns/README.md). Run each from the repository root as a module,
``python -m campaigns.fuzz``, ``python -m campaigns.faults``, ``python -m campaigns.soak``,
``python -m campaigns.train_durability``; their fast parts run as tests (tests/test_campaign_*.py)."""
