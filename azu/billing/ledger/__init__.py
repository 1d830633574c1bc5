"""The PostgreSQL ledger: double-entry accounts, job holds, deposits, payouts and API keys.

``models`` holds the tables, ``service`` the only functions that move money, ``db`` the engine/session
helpers and ``migrate``; ``billing`` adapts the service to the ``azu.billing.base.Billing`` seam. Sign-in
challenges and API keys (no money) are ``azu.billing.accounts``; ``azu.billing.factory`` builds all of it.
"""
