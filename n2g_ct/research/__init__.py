"""The paper's experiments and measurement scripts; not used by the product modules."""
