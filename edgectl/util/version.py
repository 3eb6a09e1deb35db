"""The edgectl version, written into every .pte's metadata and every manifest."""

__version__ = "0.1.0"
