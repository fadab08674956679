"""cltvit training: backbone access, the cross-layer transcoder, activation streaming, training, evaluation."""
