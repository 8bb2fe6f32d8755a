#!/usr/bin/env python3
"""Prints each crate's module import cycles: strongly connected components of the
`crate::` / `super::` references between its modules, outside tests and comments.
Nothing printed: modules form layers. Run: python3 scripts/module-cycles.py"""
import os,re,sys,itertools
root=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
crates=[d for d in os.listdir(root) if os.path.isfile(f'{root}/{d}/Cargo.toml') and os.path.isdir(f'{root}/{d}/src')]
def modname(crate,path):
    rel=os.path.relpath(path,f'{root}/{crate}/src')[:-3]
    parts=rel.split('/')
    if parts[-1] in('mod','lib','main'): parts=parts[:-1]
    return '::'.join(parts)
for c in sorted(crates):
    mods={}
    for dp,_,fs in os.walk(f'{root}/{c}/src'):
        for f in fs:
            if f.endswith('.rs'):
                p=os.path.join(dp,f); mods[modname(c,p)]=p
    edges={m:set() for m in mods}
    for m,p in mods.items():
        src=open(p).read()
        # strip test module
        i=src.find('#[cfg(test)]\nmod tests')
        if i>=0: src=src[:i]
        src='\n'.join(l for l in src.split('\n') if not l.strip().startswith('//'))
        for r in re.findall(r'crate::((?:\w+::)*\w+)',src):
            parts=r.split('::')
            # longest prefix that is a module
            for k in range(len(parts),0,-1):
                cand='::'.join(parts[:k])
                if cand in mods: 
                    if cand!=m and not m.startswith(cand+'::') : edges[m].add(cand)
                    break
        base=m.split('::')
        for r in re.findall(r'\bsuper::((?:\w+::)*\w+)',src):
            isdir=os.path.basename(p)=='mod.rs'
            parent=base[:-1]
            parts=parent+r.split('::')
            for k in range(len(parts),0,-1):
                cand='::'.join(parts[:k])
                if cand in mods:
                    if cand!=m and not m.startswith(cand+'::'): edges[m].add(cand)
                    break
    # SCCs (tarjan)
    idx={};low={};st=[];on=set();out=[];n=[0]
    sys.setrecursionlimit(10000)
    def sc(v):
        idx[v]=low[v]=n[0];n[0]+=1;st.append(v);on.add(v)
        for w in edges[v]:
            if w not in idx: sc(w);low[v]=min(low[v],low[w])
            elif w in on: low[v]=min(low[v],idx[w])
        if low[v]==idx[v]:
            comp=[]
            while True:
                w=st.pop();on.discard(w);comp.append(w)
                if w==v:break
            if len(comp)>1: out.append(comp)
    for v in edges:
        if v not in idx: sc(v)
    for comp in out:
        print(c, sorted(comp))
        for a in sorted(comp):
            print('   ',a,'->',sorted(e for e in edges[a] if e in comp))
