"""Serve deployments the end-to-end tests journal: small, deterministic models."""

from __future__ import annotations

from ray import serve


@serve.deployment(max_ongoing_requests=64)
class Rules:
    """Blocks amounts >= 50: a deterministic model so the test knows every decision."""

    async def __call__(self, request) -> dict:
        body = await request.json()
        amount = body["features"]["amount"]
        return {"score": min(1.0, amount / 100.0), "decision": "block" if amount >= 50 else "allow"}


@serve.deployment(max_ongoing_requests=64)
class Failing:
    """Raises on every call: nothing is ever served, yet every call must be journaled or counted."""

    async def __call__(self, request) -> dict:
        await request.json()
        raise ValueError("this model always fails")
