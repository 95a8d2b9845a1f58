//! A pickle *reader* that never executes anything.
//!
//! Opcodes build a tree of plain values in an arena (indices, not pointers:
//! no recursion on drop, shared memo references stay shared, cycles are
//! harmless). `GLOBAL` only resolves a fixed allow-list of torch
//! tensor-rebuilding names; `REDUCE`/`NEWOBJ`/`BUILD` are interpreted for those
//! names only (a tensor becomes a [`TensorRef`] description; its bytes are read
//! later, bounds-checked, from the zip). Anything else is an error naming it.
//! Every object created is charged to the read budget.

use super::{Ctx, DType, EmbeddingError};

pub(crate) type Id = usize;

/// Globals a learned-embedding pickle may reference. Mirrors what A1111's
/// `modules/safe.py` RestrictedUnpickler allows for embeddings (minus numpy and
/// pytorch_lightning, which no embedding needs), plus `_codecs.encode` (how
/// protocol 2 pickles `bytes`) and `_rebuild_parameter_with_state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Global {
    OrderedDict,
    RebuildTensorV2,
    RebuildParameter,
    RebuildParameterWithState,
    Storage(StorageType),
    ParameterDict,
    Set,
    CodecsEncode,
}

/// Storage classes: the float ones hold vectors, integer ones appear as
/// rinongal's 0-d token ids (parsed, never needed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StorageType {
    Float(DType),
    Other(&'static str),
}

fn resolve(module: &str, name: &str) -> Option<Global> {
    Some(match (module, name) {
        ("collections", "OrderedDict") => Global::OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2") => Global::RebuildTensorV2,
        ("torch._utils", "_rebuild_parameter") => Global::RebuildParameter,
        ("torch._utils", "_rebuild_parameter_with_state") => Global::RebuildParameterWithState,
        ("torch", "FloatStorage") => Global::Storage(StorageType::Float(DType::F32)),
        ("torch", "HalfStorage") => Global::Storage(StorageType::Float(DType::F16)),
        ("torch", "BFloat16Storage") => Global::Storage(StorageType::Float(DType::BF16)),
        ("torch", "DoubleStorage") => Global::Storage(StorageType::Float(DType::F64)),
        ("torch", "LongStorage") => Global::Storage(StorageType::Other("int64")),
        ("torch", "IntStorage") => Global::Storage(StorageType::Other("int32")),
        ("torch", "ShortStorage") => Global::Storage(StorageType::Other("int16")),
        ("torch", "CharStorage") => Global::Storage(StorageType::Other("int8")),
        ("torch", "ByteStorage") => Global::Storage(StorageType::Other("uint8")),
        ("torch", "BoolStorage") => Global::Storage(StorageType::Other("bool")),
        ("torch.nn.modules.container", "ParameterDict") => Global::ParameterDict,
        ("__builtin__" | "builtins", "set") => Global::Set,
        ("_codecs", "encode") => Global::CodecsEncode,
        _ => return None,
    })
}

/// A tensor as `_rebuild_tensor_v2` describes it; data lives in zip member `data/<key>`.
#[derive(Debug, Clone)]
pub(crate) struct TensorRef {
    pub(crate) storage: StorageType,
    pub(crate) key: String,
    pub(crate) storage_numel: u64,
    pub(crate) offset: u64,
    pub(crate) size: Vec<u64>,
    pub(crate) stride: Vec<u64>,
}

#[derive(Debug, Clone)]
pub(crate) enum Obj {
    None,
    Bool(bool),
    Int(i64),
    /// An integer wider than 64 bits; its value never matters for embeddings.
    BigInt,
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Vec<Id>),
    List(Vec<Id>),
    Dict(Vec<(Id, Id)>),
    Set(Vec<Id>),
    Global(Global),
    /// persistent_load(('storage', cls, key, location, numel)).
    Storage(Box<(StorageType, String, u64)>),
    Tensor(Box<TensorRef>),
    /// `NEWOBJ` of an allowed class (ParameterDict), with its `BUILD` state.
    Object {
        class: Global,
        state: Option<Id>,
    },
}

pub(crate) struct Pickle {
    pub(crate) arena: Vec<Obj>,
    pub(crate) root: Id,
}

impl Pickle {
    pub(crate) fn get(&self, id: Id) -> &Obj {
        self.arena.get(id).unwrap_or(&Obj::None)
    }

    pub(crate) fn as_str(&self, id: Id) -> Option<&str> {
        match self.get(id) {
            Obj::Str(s) => Some(s),
            _ => None,
        }
    }

    /// Dict entries; a ParameterDict resolves to its `_parameters` dict.
    pub(crate) fn dict_items(&self, id: Id) -> Option<&[(Id, Id)]> {
        match self.get(id) {
            Obj::Dict(items) => Some(items),
            Obj::Object {
                class: Global::ParameterDict,
                state: Some(state),
            } => {
                let params = self.lookup(*state, "_parameters")?;
                self.dict_items(params)
            }
            _ => None,
        }
    }

    pub(crate) fn lookup(&self, dict: Id, key: &str) -> Option<Id> {
        // Later keys win, as in Python.
        match self.get(dict) {
            Obj::Dict(items) => items
                .iter()
                .rev()
                .find(|(k, _)| self.as_str(*k) == Some(key))
                .map(|(_, v)| *v),
            _ => None,
        }
    }

    pub(crate) fn type_name(&self, id: Id) -> &'static str {
        match self.get(id) {
            Obj::None => "None",
            Obj::Bool(_) => "bool",
            Obj::Int(_) | Obj::BigInt => "int",
            Obj::Float(_) => "float",
            Obj::Str(_) => "str",
            Obj::Bytes(_) => "bytes",
            Obj::Tuple(_) => "tuple",
            Obj::List(_) => "list",
            Obj::Dict(_) => "dict",
            Obj::Set(_) => "set",
            Obj::Global(_) => "class/function",
            Obj::Storage(_) => "storage",
            Obj::Tensor(_) => "tensor",
            Obj::Object { .. } => "ParameterDict",
        }
    }
}

/// Pickle opcodes, named as in CPython's `pickletools`; only those `torch.save`
/// writes (protocols 2 to 5) and their plain-text forms are read.
pub(crate) mod op {
    // Protocol, framing and the stack.
    pub(crate) const PROTO: u8 = 0x80;
    pub(crate) const FRAME: u8 = 0x95;
    pub(crate) const STOP: u8 = b'.';
    pub(crate) const MARK: u8 = b'(';
    pub(crate) const POP: u8 = b'0';
    pub(crate) const POP_MARK: u8 = b'1';
    pub(crate) const DUP: u8 = b'2';
    // Scalars.
    pub(crate) const NONE: u8 = b'N';
    pub(crate) const NEWTRUE: u8 = 0x88;
    pub(crate) const NEWFALSE: u8 = 0x89;
    pub(crate) const BININT: u8 = b'J';
    pub(crate) const BININT1: u8 = b'K';
    pub(crate) const BININT2: u8 = b'M';
    pub(crate) const INT: u8 = b'I';
    pub(crate) const LONG1: u8 = 0x8a;
    pub(crate) const LONG4: u8 = 0x8b;
    pub(crate) const BINFLOAT: u8 = b'G';
    pub(crate) const FLOAT: u8 = b'F';
    // Strings and bytes.
    pub(crate) const BINUNICODE: u8 = b'X';
    pub(crate) const SHORT_BINUNICODE: u8 = 0x8c;
    pub(crate) const BINUNICODE8: u8 = 0x8d;
    pub(crate) const BINSTRING: u8 = b'T';
    pub(crate) const SHORT_BINSTRING: u8 = b'U';
    pub(crate) const BINBYTES: u8 = b'B';
    pub(crate) const SHORT_BINBYTES: u8 = b'C';
    pub(crate) const BINBYTES8: u8 = 0x8e;
    pub(crate) const BYTEARRAY8: u8 = 0x96;
    // Tuples and lists.
    pub(crate) const EMPTY_TUPLE: u8 = b')';
    pub(crate) const TUPLE: u8 = b't';
    pub(crate) const TUPLE1: u8 = 0x85;
    pub(crate) const TUPLE2: u8 = 0x86;
    pub(crate) const TUPLE3: u8 = 0x87;
    pub(crate) const EMPTY_LIST: u8 = b']';
    pub(crate) const LIST: u8 = b'l';
    pub(crate) const APPEND: u8 = b'a';
    pub(crate) const APPENDS: u8 = b'e';
    // Dicts and sets.
    pub(crate) const EMPTY_DICT: u8 = b'}';
    pub(crate) const DICT: u8 = b'd';
    pub(crate) const SETITEM: u8 = b's';
    pub(crate) const SETITEMS: u8 = b'u';
    pub(crate) const EMPTY_SET: u8 = 0x8f;
    pub(crate) const ADDITEMS: u8 = 0x90;
    pub(crate) const FROZENSET: u8 = 0x91;
    // The memo.
    pub(crate) const PUT: u8 = b'p';
    pub(crate) const BINPUT: u8 = b'q';
    pub(crate) const LONG_BINPUT: u8 = b'r';
    pub(crate) const MEMOIZE: u8 = 0x94;
    pub(crate) const GET: u8 = b'g';
    pub(crate) const BINGET: u8 = b'h';
    pub(crate) const LONG_BINGET: u8 = b'j';
    // Globals, calls, instances and persistent ids.
    pub(crate) const GLOBAL: u8 = b'c';
    pub(crate) const STACK_GLOBAL: u8 = 0x93;
    pub(crate) const REDUCE: u8 = b'R';
    pub(crate) const NEWOBJ: u8 = 0x81;
    pub(crate) const BUILD: u8 = b'b';
    pub(crate) const BINPERSID: u8 = b'Q';
}

/// Bytes charged per arena object on top of its payload: the slot, doubled
/// because a growing Vec may hold twice its length, plus stack/memo slack.
const OBJ_COST: u64 = 2 * std::mem::size_of::<Obj>() as u64 + 16;
const MAX_DIMS: usize = 8;

struct Vm<'a> {
    ctx: &'a Ctx,
    field: &'a str,
    input: &'a [u8],
    pos: usize,
    arena: Vec<Obj>,
    stack: Vec<Id>,
    marks: Vec<usize>,
    memo: std::collections::HashMap<u64, Id>,
}

impl<'a> Vm<'a> {
    fn err(&self, at: usize, reason: impl std::fmt::Display) -> EmbeddingError {
        self.ctx
            .invalid(self.field, format!("pickle byte {at}: {reason}"))
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], EmbeddingError> {
        let end = self.pos.checked_add(n).filter(|e| *e <= self.input.len());
        match end {
            Some(end) => {
                let s = &self.input[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => Err(self.ctx.truncated(
                self.field,
                format!("pickle ends inside an opcode argument at byte {}", self.pos),
            )),
        }
    }
    fn u8(&mut self) -> Result<u8, EmbeddingError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, EmbeddingError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, EmbeddingError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, EmbeddingError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    fn line(&mut self) -> Result<&'a str, EmbeddingError> {
        let rest = &self.input[self.pos..];
        let Some(nl) = rest.iter().position(|b| *b == b'\n') else {
            return Err(self.ctx.truncated(
                self.field,
                format!("unterminated text argument at byte {}", self.pos),
            ));
        };
        let at = self.pos;
        self.pos += nl + 1;
        std::str::from_utf8(&rest[..nl]).map_err(|_| self.err(at, "text argument is not UTF-8"))
    }

    fn alloc(&mut self, obj: Obj) -> Result<Id, EmbeddingError> {
        let payload = match &obj {
            Obj::Str(s) => s.len(),
            Obj::Bytes(b) => b.len(),
            Obj::Tuple(v) | Obj::List(v) | Obj::Set(v) => v.len() * 16,
            Obj::Dict(v) => v.len() * 32,
            Obj::Tensor(t) => std::mem::size_of::<TensorRef>() + t.size.len() * 16 + t.key.len(),
            Obj::Storage(s) => 48 + s.1.len(),
            _ => 0,
        };
        self.ctx.charge(OBJ_COST + payload as u64, self.field)?;
        self.arena.push(obj);
        Ok(self.arena.len() - 1)
    }
    fn push(&mut self, obj: Obj) -> Result<(), EmbeddingError> {
        let id = self.alloc(obj)?;
        self.stack.push(id);
        Ok(())
    }
    fn pop(&mut self, at: usize) -> Result<Id, EmbeddingError> {
        if self.marks.last().is_some_and(|m| *m >= self.stack.len()) {
            return Err(self.err(at, "stack underflow (pops past a MARK)"));
        }
        self.stack
            .pop()
            .ok_or_else(|| self.err(at, "stack underflow"))
    }
    fn top(&self, at: usize) -> Result<Id, EmbeddingError> {
        if self.marks.last().is_some_and(|m| *m >= self.stack.len()) {
            return Err(self.err(at, "stack underflow (reads past a MARK)"));
        }
        self.stack
            .last()
            .copied()
            .ok_or_else(|| self.err(at, "stack underflow"))
    }
    fn pop_mark(&mut self, at: usize) -> Result<Vec<Id>, EmbeddingError> {
        let m = self
            .marks
            .pop()
            .ok_or_else(|| self.err(at, "no MARK on the stack"))?;
        if m > self.stack.len() {
            return Err(self.err(at, "MARK above the stack top"));
        }
        Ok(self.stack.split_off(m))
    }
    fn int_of(&self, id: Id) -> Option<i64> {
        match self.arena.get(id)? {
            Obj::Int(i) => Some(*i),
            Obj::Bool(b) => Some(*b as i64),
            _ => None,
        }
    }
    fn uint_tuple(&self, id: Id, at: usize, what: &str) -> Result<Vec<u64>, EmbeddingError> {
        let items = match self.arena.get(id) {
            Some(Obj::Tuple(v)) | Some(Obj::List(v)) => v.clone(),
            _ => return Err(self.err(at, format!("tensor {what} is not a tuple"))),
        };
        if items.len() > MAX_DIMS {
            return Err(self.err(at, format!("tensor has {} dimensions", items.len())));
        }
        items
            .iter()
            .map(|i| {
                self.int_of(*i)
                    .and_then(|v| u64::try_from(v).ok())
                    .ok_or_else(|| {
                        self.err(
                            at,
                            format!("tensor {what} holds a non-integer or negative value"),
                        )
                    })
            })
            .collect()
    }

    fn setitems(&mut self, at: usize, dict: Id, items: Vec<Id>) -> Result<(), EmbeddingError> {
        if !items.len().is_multiple_of(2) {
            return Err(self.err(at, "SETITEMS with an odd number of items"));
        }
        self.ctx.charge(items.len() as u64 * 16, self.field)?;
        let pairs: Vec<(Id, Id)> = items.chunks_exact(2).map(|c| (c[0], c[1])).collect();
        match self.arena.get_mut(dict) {
            Some(Obj::Dict(d)) => {
                d.extend(pairs);
                Ok(())
            }
            _ => Err(self.err(at, "SETITEM(S) on something that is not a dict")),
        }
    }

    fn append(&mut self, at: usize, list: Id, items: Vec<Id>) -> Result<(), EmbeddingError> {
        self.ctx.charge(items.len() as u64 * 16, self.field)?;
        match self.arena.get_mut(list) {
            Some(Obj::List(l)) | Some(Obj::Set(l)) => {
                l.extend(items);
                Ok(())
            }
            _ => Err(self.err(
                at,
                "APPEND(S)/ADDITEMS on something that is not a list or set",
            )),
        }
    }

    fn global(&mut self, at: usize, module: &str, name: &str) -> Result<(), EmbeddingError> {
        match resolve(module, name) {
            Some(g) => self.push(Obj::Global(g)),
            None => {
                let _ = at;
                Err(EmbeddingError::ForbiddenGlobal {
                    file: self.ctx.file.clone(),
                    field: self.field.to_string(),
                    global: format!("{module}.{name}"),
                })
            }
        }
    }

    fn reduce(&mut self, at: usize, func: Id, args: Id) -> Result<Id, EmbeddingError> {
        let g = match self.arena.get(func) {
            Some(Obj::Global(g)) => *g,
            _ => return Err(self.err(at, "REDUCE of something that is not an allowed global")),
        };
        let args: Vec<Id> = match self.arena.get(args) {
            Some(Obj::Tuple(v)) => v.clone(),
            _ => return Err(self.err(at, "REDUCE arguments are not a tuple")),
        };
        match g {
            Global::RebuildTensorV2 => self.rebuild_tensor(at, &args),
            Global::RebuildParameter | Global::RebuildParameterWithState => match args.first() {
                Some(&t) if matches!(self.arena.get(t), Some(Obj::Tensor(_))) => Ok(t),
                _ => Err(self.err(at, "_rebuild_parameter: first argument is not a tensor")),
            },
            Global::OrderedDict => self.ordered_dict(at, &args),
            Global::Set => {
                let items = match args.first().and_then(|a| self.arena.get(*a)) {
                    None => Vec::new(),
                    Some(Obj::List(v)) | Some(Obj::Tuple(v)) | Some(Obj::Set(v)) => v.clone(),
                    Some(_) => return Err(self.err(at, "set(...) of an unsupported value")),
                };
                self.alloc(Obj::Set(items))
            }
            Global::CodecsEncode => {
                // Protocol 2 writes bytes as _codecs.encode(str, 'latin1').
                let s = match args.first().and_then(|a| self.arena.get(*a)) {
                    Some(Obj::Str(s)) => s.clone(),
                    _ => return Err(self.err(at, "_codecs.encode of a non-string")),
                };
                let bytes: Option<Vec<u8>> =
                    s.chars().map(|c| u8::try_from(u32::from(c)).ok()).collect();
                let bytes = bytes.ok_or_else(|| self.err(at, "_codecs.encode: non-latin1 text"))?;
                self.alloc(Obj::Bytes(bytes))
            }
            Global::Storage(_) | Global::ParameterDict => Err(self.err(
                at,
                "calling a storage or module class directly is not part of any embedding layout",
            )),
        }
    }

    /// `_rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks[, metadata])`.
    fn rebuild_tensor(&mut self, at: usize, args: &[Id]) -> Result<Id, EmbeddingError> {
        if args.len() != 6 && args.len() != 7 {
            return Err(self.err(
                at,
                format!(
                    "_rebuild_tensor_v2 takes 6 or 7 arguments, got {}",
                    args.len()
                ),
            ));
        }
        let (storage, key, numel) = match self.arena.get(args[0]) {
            Some(Obj::Storage(s)) => (s.0, s.1.clone(), s.2),
            _ => return Err(self.err(at, "_rebuild_tensor_v2: first argument is not a storage")),
        };
        let offset = self
            .int_of(args[1])
            .and_then(|v| u64::try_from(v).ok())
            .ok_or_else(|| self.err(at, "_rebuild_tensor_v2: bad storage offset"))?;
        let size = self.uint_tuple(args[2], at, "size")?;
        let stride = self.uint_tuple(args[3], at, "stride")?;
        if size.len() != stride.len() {
            return Err(self.err(at, "_rebuild_tensor_v2: size and stride differ in length"));
        }
        self.alloc(Obj::Tensor(Box::new(TensorRef {
            storage,
            key,
            storage_numel: numel,
            offset,
            size,
            stride,
        })))
    }

    /// `OrderedDict(pairs)` or `OrderedDict(dict)`; no argument is an empty dict.
    fn ordered_dict(&mut self, at: usize, args: &[Id]) -> Result<Id, EmbeddingError> {
        let mut pairs = Vec::new();
        if let Some(&src) = args.first() {
            let items = match self.arena.get(src) {
                Some(Obj::List(v)) | Some(Obj::Tuple(v)) => v.clone(),
                Some(Obj::Dict(d)) => d.iter().flat_map(|(k, v)| [*k, *v]).collect(),
                _ => return Err(self.err(at, "OrderedDict(...) of an unsupported value")),
            };
            if matches!(self.arena.get(src), Some(Obj::Dict(_))) {
                pairs = items.chunks_exact(2).map(|c| (c[0], c[1])).collect();
            } else {
                for it in items {
                    match self.arena.get(it) {
                        Some(Obj::Tuple(kv)) | Some(Obj::List(kv)) if kv.len() == 2 => {
                            pairs.push((kv[0], kv[1]))
                        }
                        _ => return Err(self.err(at, "OrderedDict(...) item is not a pair")),
                    }
                }
            }
        }
        self.alloc(Obj::Dict(pairs))
    }

    fn persistent_load(&mut self, at: usize, pid: Id) -> Result<Id, EmbeddingError> {
        let items = match self.arena.get(pid) {
            Some(Obj::Tuple(v)) => v.clone(),
            _ => return Err(self.err(at, "persistent id is not a tuple")),
        };
        let bad = || {
            self.err(
                at,
                "persistent id is not ('storage', StorageClass, key, location, numel)",
            )
        };
        if items.len() != 5
            || self.arena.get(items[0]).and_then(|o| {
                if let Obj::Str(s) = o {
                    Some(s.as_str())
                } else {
                    None
                }
            }) != Some("storage")
        {
            return Err(bad());
        }
        let storage = match self.arena.get(items[1]) {
            Some(Obj::Global(Global::Storage(s))) => *s,
            _ => return Err(bad()),
        };
        let key = match self.arena.get(items[2]) {
            Some(Obj::Str(s)) => s.clone(),
            _ => return Err(bad()),
        };
        if !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') || key.is_empty() {
            return Err(self.err(
                at,
                format!("storage key '{key}' is not a plain record name"),
            ));
        }
        let numel = self
            .int_of(items[4])
            .and_then(|v| u64::try_from(v).ok())
            .ok_or_else(bad)?;
        self.alloc(Obj::Storage(Box::new((storage, key, numel))))
    }

    /// Runs opcodes to STOP, one family at a time; an opcode torch.save never
    /// writes is refused by name of its byte.
    fn run(&mut self) -> Result<Id, EmbeddingError> {
        loop {
            let at = self.pos;
            let code = self.u8()?;
            match code {
                op::STOP => return self.pop(at),
                op::PROTO | op::FRAME | op::MARK | op::POP | op::POP_MARK | op::DUP => {
                    self.stack_op(at, code)?
                }
                op::NONE
                | op::NEWTRUE
                | op::NEWFALSE
                | op::BININT
                | op::BININT1
                | op::BININT2
                | op::INT
                | op::LONG1
                | op::LONG4
                | op::BINFLOAT
                | op::FLOAT => self.scalar(at, code)?,
                op::BINUNICODE
                | op::SHORT_BINUNICODE
                | op::BINUNICODE8
                | op::BINSTRING
                | op::SHORT_BINSTRING
                | op::BINBYTES
                | op::SHORT_BINBYTES
                | op::BINBYTES8
                | op::BYTEARRAY8 => self.text(at, code)?,
                op::EMPTY_TUPLE
                | op::TUPLE
                | op::TUPLE1..=op::TUPLE3
                | op::EMPTY_LIST
                | op::LIST
                | op::APPEND
                | op::APPENDS => self.sequence(at, code)?,
                op::EMPTY_DICT
                | op::DICT
                | op::SETITEM
                | op::SETITEMS
                | op::EMPTY_SET
                | op::ADDITEMS
                | op::FROZENSET => self.mapping_or_set(at, code)?,
                op::BINPUT | op::LONG_BINPUT | op::MEMOIZE | op::PUT => self.memo_put(at, code)?,
                op::BINGET | op::LONG_BINGET | op::GET => self.memo_get(at, code)?,
                op::GLOBAL | op::STACK_GLOBAL => self.global_op(at, code)?,
                op::REDUCE | op::NEWOBJ | op::BUILD | op::BINPERSID => self.object_op(at, code)?,
                other => return Err(self.refused(at, other)),
            }
        }
    }

    fn refused(&self, at: usize, code: u8) -> EmbeddingError {
        self.err(
            at,
            format!("opcode 0x{code:02x} is not used by torch.save and is refused"),
        )
    }

    /// Protocol, framing and the mark stack.
    fn stack_op(&mut self, at: usize, code: u8) -> Result<(), EmbeddingError> {
        match code {
            op::PROTO => {
                let proto = self.u8()?;
                if proto > 5 {
                    return Err(self.err(at, format!("pickle protocol {proto} is newer than 5")));
                }
            }
            op::FRAME => {
                self.u64()?; // FRAME length: frames are only a buffering hint
            }
            op::MARK => self.marks.push(self.stack.len()),
            op::POP => {
                self.pop(at)?;
            }
            op::POP_MARK => {
                self.pop_mark(at)?;
            }
            op::DUP => {
                let t = self.top(at)?;
                self.stack.push(t);
            }
            other => return Err(self.refused(at, other)),
        }
        Ok(())
    }

    /// None, booleans, integers and floats.
    fn scalar(&mut self, at: usize, code: u8) -> Result<(), EmbeddingError> {
        let o = match code {
            op::NONE => Obj::None,
            op::NEWTRUE => Obj::Bool(true),
            op::NEWFALSE => Obj::Bool(false),
            op::BININT => Obj::Int(self.u32()? as i32 as i64),
            op::BININT1 => Obj::Int(self.u8()? as i64),
            op::BININT2 => Obj::Int(self.u16()? as i64),
            op::INT => {
                let l = self.line()?;
                match l {
                    "00" => Obj::Bool(false),
                    "01" => Obj::Bool(true),
                    _ => Obj::Int(
                        l.trim()
                            .parse()
                            .map_err(|_| self.err(at, "bad INT literal"))?,
                    ),
                }
            }
            op::LONG1 | op::LONG4 => {
                let n = if code == op::LONG1 {
                    self.u8()? as usize
                } else {
                    self.u32()? as usize
                };
                let b = self.take(n)?;
                if n == 0 {
                    Obj::Int(0)
                } else if n <= 8 {
                    let mut a = [if b[n - 1] & 0x80 != 0 { 0xFF } else { 0 }; 8];
                    a[..n].copy_from_slice(b);
                    Obj::Int(i64::from_le_bytes(a))
                } else {
                    Obj::BigInt
                }
            }
            op::BINFLOAT => {
                let b = self.take(8)?;
                let mut a = [0u8; 8];
                a.copy_from_slice(b);
                Obj::Float(f64::from_be_bytes(a))
            }
            op::FLOAT => {
                let l = self.line()?;
                let v = l
                    .trim()
                    .parse()
                    .map_err(|_| self.err(at, "bad FLOAT literal"))?;
                Obj::Float(v)
            }
            other => return Err(self.refused(at, other)),
        };
        self.push(o)
    }

    /// Unicode strings, py2 byte strings (read as latin-1 text) and the bytes family.
    fn text(&mut self, at: usize, code: u8) -> Result<(), EmbeddingError> {
        if matches!(
            code,
            op::BINUNICODE | op::SHORT_BINUNICODE | op::BINUNICODE8
        ) {
            let n = match code {
                op::BINUNICODE => self.u32()? as u64,
                op::SHORT_BINUNICODE => self.u8()? as u64,
                _ => self.u64()?,
            };
            let n = usize::try_from(n).map_err(|_| self.err(at, "string length overflows"))?;
            let b = self.take(n)?;
            let s = std::str::from_utf8(b).map_err(|_| self.err(at, "string is not UTF-8"))?;
            return self.push(Obj::Str(s.to_string()));
        }
        let n = match code {
            op::BINSTRING | op::BINBYTES => self.u32()? as u64,
            op::SHORT_BINSTRING | op::SHORT_BINBYTES => self.u8()? as u64,
            op::BINBYTES8 | op::BYTEARRAY8 => self.u64()?,
            other => return Err(self.refused(at, other)),
        };
        let n = usize::try_from(n).map_err(|_| self.err(at, "length overflows"))?;
        let b = self.take(n)?;
        let o = if matches!(code, op::BINSTRING | op::SHORT_BINSTRING) {
            Obj::Str(b.iter().map(|c| *c as char).collect())
        } else {
            Obj::Bytes(b.to_vec())
        };
        self.push(o)
    }

    /// Tuples and lists.
    fn sequence(&mut self, at: usize, code: u8) -> Result<(), EmbeddingError> {
        match code {
            op::EMPTY_TUPLE => self.push(Obj::Tuple(Vec::new())),
            op::TUPLE => {
                let items = self.pop_mark(at)?;
                self.push(Obj::Tuple(items))
            }
            op::TUPLE1..=op::TUPLE3 => {
                let n = (code - op::TUPLE1 + 1) as usize;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.pop(at)?);
                }
                items.reverse();
                self.push(Obj::Tuple(items))
            }
            op::EMPTY_LIST => self.push(Obj::List(Vec::new())),
            op::LIST => {
                let items = self.pop_mark(at)?;
                self.push(Obj::List(items))
            }
            op::APPEND => {
                let v = self.pop(at)?;
                let l = self.top(at)?;
                self.append(at, l, vec![v])
            }
            op::APPENDS => {
                let items = self.pop_mark(at)?;
                let l = self.top(at)?;
                self.append(at, l, items)
            }
            other => Err(self.refused(at, other)),
        }
    }

    /// Dicts and sets.
    fn mapping_or_set(&mut self, at: usize, code: u8) -> Result<(), EmbeddingError> {
        match code {
            op::EMPTY_DICT => self.push(Obj::Dict(Vec::new())),
            op::DICT => {
                let items = self.pop_mark(at)?;
                let id = self.alloc(Obj::Dict(Vec::new()))?;
                self.setitems(at, id, items)?;
                self.stack.push(id);
                Ok(())
            }
            op::SETITEM => {
                let v = self.pop(at)?;
                let k = self.pop(at)?;
                let d = self.top(at)?;
                self.setitems(at, d, vec![k, v])
            }
            op::SETITEMS => {
                let items = self.pop_mark(at)?;
                let d = self.top(at)?;
                self.setitems(at, d, items)
            }
            op::EMPTY_SET => self.push(Obj::Set(Vec::new())),
            op::ADDITEMS => {
                let items = self.pop_mark(at)?;
                let s = self.top(at)?;
                self.append(at, s, items)
            }
            op::FROZENSET => {
                let items = self.pop_mark(at)?;
                self.push(Obj::Set(items))
            }
            other => Err(self.refused(at, other)),
        }
    }

    /// Stores the stack top in the memo.
    fn memo_put(&mut self, at: usize, code: u8) -> Result<(), EmbeddingError> {
        let key = match code {
            op::BINPUT => self.u8()? as u64,
            op::LONG_BINPUT => self.u32()? as u64,
            op::PUT => self
                .line()?
                .trim()
                .parse()
                .map_err(|_| self.err(at, "bad PUT index"))?,
            op::MEMOIZE => self.memo.len() as u64,
            other => return Err(self.refused(at, other)),
        };
        let t = self.top(at)?;
        self.ctx.charge(32, self.field)?;
        self.memo.insert(key, t);
        Ok(())
    }

    /// Pushes a memo entry again (the same object, shared).
    fn memo_get(&mut self, at: usize, code: u8) -> Result<(), EmbeddingError> {
        let key = match code {
            op::BINGET => self.u8()? as u64,
            op::LONG_BINGET => self.u32()? as u64,
            op::GET => self
                .line()?
                .trim()
                .parse()
                .map_err(|_| self.err(at, "bad GET index"))?,
            other => return Err(self.refused(at, other)),
        };
        let id = *self
            .memo
            .get(&key)
            .ok_or_else(|| self.err(at, format!("memo {key} was never stored")))?;
        self.stack.push(id);
        Ok(())
    }

    /// A class or function by module and name, checked against the allow-list.
    fn global_op(&mut self, at: usize, code: u8) -> Result<(), EmbeddingError> {
        match code {
            op::GLOBAL => {
                let module = self.line()?;
                let name = self.line()?;
                self.global(at, module, name)
            }
            op::STACK_GLOBAL => {
                let name = self.pop(at)?;
                let module = self.pop(at)?;
                let (Some(Obj::Str(m)), Some(Obj::Str(n))) =
                    (self.arena.get(module), self.arena.get(name))
                else {
                    return Err(self.err(at, "STACK_GLOBAL operands are not strings"));
                };
                let (m, n) = (m.clone(), n.clone());
                self.global(at, &m, &n)
            }
            other => Err(self.refused(at, other)),
        }
    }

    /// Calls, instances, their state and persistent ids: interpreted for the
    /// allowed globals only, never executed.
    fn object_op(&mut self, at: usize, code: u8) -> Result<(), EmbeddingError> {
        let id = match code {
            op::REDUCE => {
                let args = self.pop(at)?;
                let func = self.pop(at)?;
                self.reduce(at, func, args)?
            }
            op::NEWOBJ => return self.newobj(at),
            op::BUILD => return self.build(at),
            op::BINPERSID => {
                let pid = self.pop(at)?;
                self.persistent_load(at, pid)?
            }
            other => return Err(self.refused(at, other)),
        };
        self.stack.push(id);
        Ok(())
    }

    fn newobj(&mut self, at: usize) -> Result<(), EmbeddingError> {
        let args = self.pop(at)?;
        let cls = self.pop(at)?;
        match (self.arena.get(cls), self.arena.get(args)) {
            (Some(Obj::Global(Global::ParameterDict)), Some(Obj::Tuple(a))) if a.is_empty() => self
                .push(Obj::Object {
                    class: Global::ParameterDict,
                    state: None,
                }),
            (Some(Obj::Global(Global::OrderedDict)), Some(Obj::Tuple(a))) if a.is_empty() => {
                self.push(Obj::Dict(Vec::new()))
            }
            _ => Err(self.err(at, "NEWOBJ of a class that no embedding layout uses")),
        }
    }

    fn build(&mut self, at: usize) -> Result<(), EmbeddingError> {
        let state = self.pop(at)?;
        let obj = self.top(at)?;
        match self.arena.get_mut(obj) {
            Some(Obj::Object { state: s, .. }) => *s = Some(state),
            // An OrderedDict's BUILD state is None or its attribute dict: nothing to keep.
            Some(Obj::Dict(_)) => {}
            _ => return Err(self.err(at, "BUILD on an object that no embedding layout uses")),
        }
        Ok(())
    }
}

/// Run a pickle to its STOP and return the value tree.
pub(crate) fn parse(ctx: &Ctx, field: &str, input: &[u8]) -> Result<Pickle, EmbeddingError> {
    let mut vm = Vm {
        ctx,
        field,
        input,
        pos: 0,
        arena: Vec::new(),
        stack: Vec::new(),
        marks: Vec::new(),
        memo: std::collections::HashMap::new(),
    };
    let root = vm.run()?;
    Ok(Pickle {
        arena: vm.arena,
        root,
    })
}

/// Emits protocol-2 pickles shaped exactly like torch.save's (no memo: it is
/// optional and torch/A1111 load fine without it).
pub(crate) struct Writer {
    pub(crate) out: Vec<u8>,
}

impl Writer {
    pub(crate) fn new() -> Writer {
        Writer {
            out: vec![op::PROTO, 2],
        }
    }
    pub(crate) fn op(&mut self, op: u8) {
        self.out.push(op);
    }
    pub(crate) fn str(&mut self, s: &str) {
        self.out.push(op::BINUNICODE);
        self.out.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.out.extend_from_slice(s.as_bytes());
    }
    pub(crate) fn int(&mut self, v: i64) {
        if (0..256).contains(&v) {
            self.out.extend_from_slice(&[op::BININT1, v as u8]);
        } else if (0..65536).contains(&v) {
            self.out.push(op::BININT2);
            self.out.extend_from_slice(&(v as u16).to_le_bytes());
        } else if i32::try_from(v).is_ok() {
            self.out.push(op::BININT);
            self.out.extend_from_slice(&(v as i32).to_le_bytes());
        } else {
            // LONG1 with the minimal two's-complement width, as pickle does.
            let bytes = v.to_le_bytes();
            let mut n = 8;
            while n > 1 {
                let top = bytes[n - 1];
                let next_sign = bytes[n - 2] & 0x80;
                if (top == 0 && next_sign == 0) || (top == 0xFF && next_sign != 0) {
                    n -= 1;
                } else {
                    break;
                }
            }
            self.out.extend_from_slice(&[op::LONG1, n as u8]);
            self.out.extend_from_slice(&bytes[..n]);
        }
    }
    pub(crate) fn opt_str(&mut self, s: Option<&str>) {
        match s {
            Some(s) => self.str(s),
            None => self.op(op::NONE),
        }
    }
    pub(crate) fn global(&mut self, module: &str, name: &str) {
        self.out.push(op::GLOBAL);
        self.out.extend_from_slice(module.as_bytes());
        self.out.push(b'\n');
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(b'\n');
    }
    /// `torch._utils._rebuild_tensor_v2(storage 'key', 0, (n, dim), (dim, 1), False, OrderedDict())`
    pub(crate) fn tensor_2d(&mut self, storage_class: &str, key: &str, n: usize, dim: usize) {
        self.global("torch._utils", "_rebuild_tensor_v2");
        self.op(op::MARK);
        self.op(op::MARK);
        self.str("storage");
        self.global("torch", storage_class);
        self.str(key);
        self.str("cpu");
        self.int((n * dim) as i64);
        self.op(op::TUPLE);
        self.op(op::BINPERSID);
        self.int(0);
        self.int(n as i64);
        self.int(dim as i64);
        self.op(op::TUPLE2);
        self.int(dim as i64);
        self.int(1);
        self.op(op::TUPLE2);
        self.op(op::NEWFALSE);
        self.global("collections", "OrderedDict");
        self.op(op::EMPTY_TUPLE);
        self.op(op::REDUCE);
        self.op(op::TUPLE);
        self.op(op::REDUCE);
    }
    pub(crate) fn finish(mut self) -> Vec<u8> {
        self.out.push(op::STOP);
        self.out
    }
}
