"""The model publisher's tools: sealed bundles, the key broker server, and their CLI verbs."""
