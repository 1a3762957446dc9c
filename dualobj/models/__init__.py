"""dualobj.models (see docs/)."""
