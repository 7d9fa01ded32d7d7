"""Runs in the model process only (torch, TotalSegmentator, nnU-Net): never imported by a worker's own code paths except to start that process."""
