"""Experiments and monitoring: the inference log's writer (`writer`), sampled payload capture
(`payloads`), and the pure maths of model reports (`report`) and drift (`drift`)."""
