"""The former path of `python -m deeplab2_kmax.data.build.synthetic`, kept while
docs/benchmarks.md (being edited in another branch) still names it; remove it together with
that mention."""

import runpy

if __name__ == '__main__':
  runpy.run_module('deeplab2_kmax.data.build.synthetic', run_name='__main__', alter_sys=True)
