"""The call tracker's features (ami_gateway/tracker.py), one module each: consultation by Atxfer, hold by
parking, call pickup and DTMF. Each works on the tracker's channel graph and reports through its call moments."""
