"""Deployment: systemd units (deploy/systemd/), the NixOS module (deploy/nixos/), their renderer."""
