"""The neuron report's index of every unit: one sortable table of trained and random-
weights units, and the panel a row opens (top inputs cut from the JPEG sprite sheets
beside the page, a histogram with the threshold, the optimal stimulus where computed).

The table and panels are drawn by a small inline script from the index that
`evals.neurons.panels.unit_index` puts in metrics.json, embedded as JSON in the page;
only the rows in view (400 by default) are in the DOM, and a sprite sheet loads only
when a panel shows one of its thumbnails, so a page stays small with thousands of units.
"""

from __future__ import annotations

import base64
import json

INDEX_STYLE = """
#index-wrap{display:flex;gap:14px;align-items:flex-start}#index-box{max-height:640px;overflow:auto;
min-width:430px}#index th{cursor:pointer;position:sticky;top:0}#index tr.random td{color:#555}
#index tr:hover{background:#eef}#index tr.sel{background:#dde8ff}#unit-panel{flex:1;position:sticky;top:0;border:1px solid #ccc;
padding:6px 10px;min-height:300px}.thumbs{display:flex;flex-wrap:wrap;gap:3px}
.thumb{border:3px solid #ccc;font-size:10px;text-align:center}.thumb.c1{border-color:#2e9e44}
.thumb.c0{border-color:#d9534f}.thumb img{display:block;object-fit:none}
"""

INDEX_JS = r"""
(function(){
const data=JSON.parse(document.getElementById('unit-index').textContent);
const S=data.sprite, rows=[];
for(const [layer,e] of Object.entries(data.layers)){for(const side of ['trained','random']){
 const d=e[side]; if(!d) continue;
 for(let u=0;u<d.heldout.length;u++) rows.push({layer,side,unit:u,heldout:d.heldout[u],auroc:d.auroc[u],le:d.le[u]});}}
let key='auroc',desc=true,side='both',limit=400;
const tbody=document.querySelector('#index tbody'), count=document.getElementById('index-count');
function cell(tr,text,cls){const td=document.createElement('td');td.textContent=text;if(cls)td.className=cls;tr.appendChild(td);}
function draw(){
 const shown=rows.filter(r=>side==='both'||r.side===side);
 shown.sort((a,b)=>{const x=a[key],y=b[key];const c=typeof x==='string'?x.localeCompare(y):x-y;return (desc?-c:c)||a.unit-b.unit;});
 tbody.replaceChildren();
 for(const r of shown.slice(0,limit)){
  const tr=document.createElement('tr');tr.className=r.side;tr.dataset.id=r.layer+'/'+r.side+'/'+r.unit;
  cell(tr,r.side==='trained'?'trained':'random w.','l');cell(tr,r.layer,'l');cell(tr,String(r.unit));
  cell(tr,r.heldout.toFixed(3));cell(tr,r.auroc.toFixed(3));cell(tr,r.le.toFixed(3));
  tr.addEventListener('click',()=>{history.replaceState(null,'','#unit='+tr.dataset.id);show(r.layer,r.side,r.unit);});
  tbody.appendChild(tr);}
 count.textContent=Math.min(limit,shown.length)+' of '+shown.length+' units shown';
}
function svg(tag,attrs,parent){const el=document.createElementNS('http://www.w3.org/2000/svg',tag);
 for(const [k,v] of Object.entries(attrs)) el.setAttribute(k,v); if(parent) parent.appendChild(el); return el;}
function histogram(d,u){
 const W=300,H=100,pos=d.hist_pos[u],neg=d.hist_neg[u],lo=d.range[0][u],hi=d.range[1][u];
 const top=Math.max(1,...pos,...neg),n=pos.length,bw=(W-20)/n;
 const s=svg('svg',{width:W,height:H+30,class:'hist'});
 [[pos,'#2e9e44'],[neg,'#d9534f']].forEach(([c,col])=>c.forEach((v,i)=>{const h=(H-4)*v/top;
  svg('rect',{x:10+i*bw,y:H-h,width:Math.max(bw-1,1),height:h,fill:col,'fill-opacity':0.55},s);}));
 const t=d.threshold[u],x=10+(W-20)*(t-lo)/(hi-lo);
 if(isFinite(x)) svg('line',{x1:x,x2:x,y1:0,y2:H,stroke:'#222','stroke-width':1.5},s);
 const lab=(x,y,text,col)=>{const el=svg('text',{x,y,'font-size':10,fill:col||'#222'},s);el.textContent=text;};
 lab(10,H+12,lo.toPrecision(3));lab(W-45,H+12,hi.toPrecision(3));
 lab(10,H+26,'cat','#2e9e44');lab(50,H+26,'no cat','#d9534f');lab(110,H+26,'line: threshold');
 return s;
}
function show(layer,sd,u){
 const d=data.layers[layer]&&data.layers[layer][sd]; if(!d||u>=d.heldout.length) return;
 const p=document.getElementById('unit-panel'); p.hidden=false; p.replaceChildren();
 p.dataset.shown=layer+'/'+sd+'/'+u;
 for(const tr of tbody.querySelectorAll('tr.sel')) tr.classList.remove('sel');
 const row=tbody.querySelector('tr[data-id="'+CSS.escape(layer+'/'+sd+'/'+u)+'"]'); if(row) row.classList.add('sel');
 const h=document.createElement('h3');h.textContent=(sd==='trained'?'Trained':'Random weights')+': '+layer+' #'+u;p.appendChild(h);
 const nums=document.createElement('p');nums.className='note';
 nums.textContent='held-out accuracy '+d.heldout[u].toFixed(3)+', AUROC '+d.auroc[u].toFixed(3)+', Le et al. '+d.le[u].toFixed(3)+
  '; concept when '+(d.sign[u]>0?'above':'below')+' '+d.threshold[u].toPrecision(3);p.appendChild(nums);
 const cap=document.createElement('p');cap.className='note';
 cap.textContent='Top '+d.top[u].length+' responses on the concept set (green: cat, red: no cat), response under each:';p.appendChild(cap);
 const thumbs=document.createElement('div');thumbs.className='thumbs';
 d.top[u].forEach((i,j)=>{const sheet=Math.floor(i/S.per_sheet),k=i%S.per_sheet;
  const box=document.createElement('div');box.className='thumb c'+d.top_labels[u][j];
  const img=document.createElement('img');img.src='sprites_'+sheet+'.jpg';img.alt='input';img.width=S.thumb;img.height=S.thumb;
  img.style.objectPosition=(-(k%S.columns)*S.thumb)+'px '+(-Math.floor(k/S.columns)*S.thumb)+'px';
  box.appendChild(img);box.appendChild(document.createTextNode(d.top_values[u][j].toPrecision(3)));thumbs.appendChild(box);});
 p.appendChild(thumbs);p.appendChild(histogram(d,u));
 const st=(data.stimuli[layer]||{})[u];
 if(sd==='trained'&&st){const f=document.createElement('figure');const img=document.createElement('img');img.src=st;img.alt='optimal stimulus';
  const c=document.createElement('figcaption');c.textContent='optimal stimulus';f.appendChild(img);f.appendChild(c);p.appendChild(f);}
}
for(const th of document.querySelectorAll('#index th[data-key]')) th.addEventListener('click',()=>{
 if(key===th.dataset.key) desc=!desc; else {key=th.dataset.key;desc=th.dataset.key!=='unit'&&th.dataset.key!=='layer';} draw();});
for(const b of document.querySelectorAll('#index-side button')) b.addEventListener('click',()=>{side=b.dataset.side;draw();});
document.getElementById('index-all').addEventListener('click',()=>{limit=Infinity;draw();});
draw();
const m=/^#unit=(.+)\/(trained|random)\/(\d+)$/.exec(decodeURIComponent(location.hash));
if(m){show(m[1],m[2],+m[3]);
 const units=document.getElementById('units');
 if(/[?&]shot\b/.test(location.search)){let e=units.previousElementSibling;while(e){const p=e.previousElementSibling;if(e.tagName!=='H1')e.hidden=true;e=p;}}
 else units.scrollIntoView();}
})();
"""


def index_section(metrics: dict, images: dict[str, bytes]) -> str:
    index = metrics.get("index")
    if not index:
        return ""
    stimuli = {
        name: {
            s["unit"]: "data:image/png;base64," + base64.b64encode(images[s["file"]]).decode()
            for s in layer.get("stimuli", [])
            if s["file"] in images
        }
        for name, layer in metrics["layers"].items()
    }
    payload = json.dumps({**index, "stimuli": stimuli}, separators=(",", ":"))
    head = "".join(
        f"<th data-key='{k}' class='{c}'>{t}</th>"
        for k, t, c in (
            ("side", "weights", "l"),
            ("layer", "layer", "l"),
            ("unit", "unit", ""),
            ("heldout", "held-out acc.", ""),
            ("auroc", "AUROC", ""),
            ("le", "Le et al.", ""),
        )
    )
    return (
        "<h2 id='units'>Every unit, trained and random weights side by side</h2>"
        "<p class='note'>Click a column to sort, a row to open the unit. The same architecture "
        "with random weights is listed in the same table: a concept unit must sit clearly above "
        "the random units, not just above chance. Sorting by a test-half score is choosing on the "
        "test half (biased upward, as Le et al.'s score is); the headline unit above was chosen "
        "on the selection half.</p>"
        "<p id='index-side'>show: <button data-side='both'>both</button> "
        "<button data-side='trained'>trained</button> <button data-side='random'>random weights</button> "
        "<button id='index-all'>all rows</button> <span id='index-count' class='note'></span></p>"
        "<div id='index-wrap'><div id='index-box'><table id='index'><thead><tr>"
        f"{head}</tr></thead><tbody></tbody></table></div>"
        "<div id='unit-panel' hidden></div></div>"
        "<script type='application/json' id='unit-index'>"
        + payload.replace("<", "\\u003c")
        + f"</script><script>{INDEX_JS}</script>"
    )
