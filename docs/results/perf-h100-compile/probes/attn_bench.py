import torch, torch.nn.functional as F
def t(fn, n=50):
    for _ in range(10): fn()
    torch.cuda.synchronize(); ts=[]
    for _ in range(n):
        a,b=torch.cuda.Event(True),torch.cuda.Event(True); a.record(); fn(); b.record(); b.synchronize(); ts.append(a.elapsed_time(b))
    ts.sort(); return ts[n//2]
for b, s in [(1,128),(32,128),(32,512)]:
    q,k,v = [torch.randn(b,12,s,64,device="cuda",dtype=torch.float16) for _ in range(3)]
    bias = torch.zeros(b,1,s,s,device="cuda",dtype=torch.float16).expand(b,12,s,s)
    res = {}
    res["efficient+bias"] = t(lambda: torch.ops.aten._scaled_dot_product_efficient_attention(q,k,v,bias,False))
    res["efficient"] = t(lambda: torch.ops.aten._scaled_dot_product_efficient_attention(q,k,v,None,False))
    res["flash"] = t(lambda: torch.ops.aten._scaled_dot_product_flash_attention(q,k,v))
    try: res["cudnn+bias"] = t(lambda: torch.ops.aten._scaled_dot_product_cudnn_attention(q,k,v,bias,False,0.0,False,False))
    except Exception as e: res["cudnn+bias"] = str(e)[:80]
    try: res["cudnn"] = t(lambda: torch.ops.aten._scaled_dot_product_cudnn_attention(q,k,v,None,False,0.0,False,False))
    except Exception as e: res["cudnn"] = str(e)[:80]
    print(b, s, {k: (round(v,4) if isinstance(v,float) else v) for k,v in res.items()}, flush=True)
