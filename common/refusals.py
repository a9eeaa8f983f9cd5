"""Fixed refusal codes: the only error vocabulary that crosses a site boundary.

A refusal leaves a site as "CODE: message", where the message is built only from the plan and
the site's policy (never from data, never from exception text); see docs/security.md.
"""

# Largest serialized SignedPlan a guard accepts (its gRPC receive limit; the relay checks it first).
MAX_PLAN_BYTES = 4 * 1024 * 1024

REFUSAL_CODES = {
    "MALFORMED_PLAN": "the plan cannot be parsed or is structurally invalid",
    "DICTIONARY_MISMATCH": "the plan is written against another dictionary",
    "UNKNOWN_VARIABLE": "a marginal names a variable the dictionary does not have",
    "VARIABLE_NOT_ALLOWED": "the site's policy does not release this variable (or not in this marginal width)",
    "BAD_RHO": "a rho is not a positive finite number",
    "POLICY_LIMIT": "the plan exceeds a policy limit (rho per plan, marginals, width, cells)",
    "RATE_LIMITED": "the site's daily plan limit is reached",
    "OVER_BUDGET": "the plan would exceed the site's remaining lifetime budget",
    "DUPLICATE_PLAN": "the plan id was already answered",
    "UNTRUSTED_SIGNER": "the plan is not signed by an allowlisted coordinator key",
    "BAD_SIGNATURE": "the plan's signature does not verify",
    "NOT_ADDRESSED": "the plan is addressed to other sites (names and key fingerprints), not to this one",
    "PLAN_EXPIRED": "the plan has expired, or expires too far in the future",
    "REPLAYED_PLAN": "the plan id was seen before",
    "SECURE_AGGREGATION": "the site does not join this masked sum (policy, roster or enrollment)",
    "INTERNAL": "the guard failed; details are in the site's own log",
}
# Codes the relay itself uses when the guard gives no answer.
RELAY_CODES = {
    "GUARD_UNAVAILABLE": "the site guard could not be reached",
    "GUARD_TIMEOUT": "the site guard did not answer in time",
    "RELAY_MISCONFIGURED": "the SuperNode has no guard-address",
    "RELAY_ERROR": "the relay could not process the message",
    "PLAN_TOO_LARGE": "the signed plan exceeds the guard's message size limit",
    "GUARD_BUSY": "the site guard is at its limit of concurrent requests",
}
