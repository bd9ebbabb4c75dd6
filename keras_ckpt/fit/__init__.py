"""The per-fit machinery: one session per `fit`, the stateful-callback protocol, step guards."""
