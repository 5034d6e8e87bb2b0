"""Billing handlers, one module per event family (DESIGN §5), and the `Outcome` they return."""

from billingd.handlers.kit.base import Handler, HandlerSpec, Message
from billingd.handlers.kit.outcome import ACK, Ack, DeadLetter, InvalidMessage, Outcome, Retry

__all__ = ["ACK", "Ack", "DeadLetter", "Handler", "HandlerSpec", "InvalidMessage", "Message", "Outcome", "Retry"]
