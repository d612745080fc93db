"""The signed wire formats both sides produce and check: vouchers, receipts, adverts, key releases, E2E sealing,
x402 envelopes. Imports nothing above itself.
"""
