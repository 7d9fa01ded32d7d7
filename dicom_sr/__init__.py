"""DICOM result objects built from a measurement: SEG, TID 1500 SR and key image."""
