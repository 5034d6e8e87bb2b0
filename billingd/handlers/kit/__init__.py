"""The public handler kit: what a handler is and gets (`base`), the outcomes it returns (`outcome`),
money as integers (`money`). Re-exported, with the effect building blocks, by `billingd.api`:
plugins import from there."""
