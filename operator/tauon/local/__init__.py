"""Run rendered pods as local processes (`tauon run --local`, `tauon node`)."""
