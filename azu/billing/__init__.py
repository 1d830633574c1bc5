"""Money: economics, the double-entry ledger, API keys, the billing seam."""
