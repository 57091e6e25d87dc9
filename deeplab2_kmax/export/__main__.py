"""`python -m deeplab2_kmax.export`: see deeplab2_kmax/export/__init__.py."""

from deeplab2_kmax.export import cli

if __name__ == '__main__':
  cli.run()
