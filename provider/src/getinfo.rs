//! `fi_getinfo` for vfmig: what the provider offers, checked against the application's hints.
//!
//! The offer is one `fi_info`: `FI_EP_RDM` with tagged and untagged messages, directed receive,
//! remote CQ data of 4 bytes, `FI_AV_MAP` or `FI_AV_TABLE`, `FI_THREAD_DOMAIN`, manual data
//! progress, no memory registration required, no mode bits required. Anything the hints ask
//! beyond that is refused with the reason ([`Refusal`]), which becomes `-FI_ENODATA`.
//! [`Hints`] is an owned copy of the C hints, so the checks are plain Rust and unit tested; the
//! C list is allocated by [`alloc_info`] through libfabric's own `fi_dupinfo`, so that the
//! core's `fi_freeinfo` frees it.

use std::ffi::{CStr, CString};

use crate::error::FiError;
use crate::ffi;

/// The provider's name, as `fi_info -p` and `FI_PROVIDER` spell it.
pub const PROVIDER_NAME: &str = "vfmig";
/// The provider's own version (`fi_provider.version`, `fabric_attr->prov_version`).
pub const PROVIDER_VERSION: u32 = ffi::fi_version(0, 1);
/// The oldest API version answered: 1.5 gave `mr_mode` its bit meaning (Open MPI 4.1 asks 1.5).
pub const MIN_API_VERSION: u32 = ffi::fi_version(1, 5);
/// The largest message: eager messages only, one bounce buffer each.
pub const MAX_MSG_SIZE: usize = vfmig_guest::channel::MAX_MESSAGE;
/// Sends up to this size complete at once (`fi_inject`, `FI_INJECT`).
pub const INJECT_SIZE: usize = 256;
/// Bytes of remote CQ data carried by a message (the VF's immediate is 32 bits).
pub const CQ_DATA_SIZE: usize = 4;
/// Outstanding operations per queue.
pub const QUEUE_SIZE: usize = 1024;
/// Bytes of unexpected messages buffered per endpoint.
pub const BUFFERED_RECV: usize = 4 * 1024 * 1024;
/// Tag bits: every one of the 64 is matched (libfabric's internal `OFI_TAG_GENERIC`; Open MPI
/// counts the leading zeros of this value as bits the provider reserves, and there are none).
pub const MEM_TAG_FORMAT: u64 = 0xAAAA_AAAA_AAAA_AAAA;

const PRIMARY_CAPS: u64 = ffi::FI_MSG as u64
    | ffi::FI_TAGGED as u64
    | ffi::FI_SEND as u64
    | ffi::FI_RECV as u64
    | ffi::FI_DIRECTED_RECV
    | ffi::FI_REMOTE_CQ_DATA as u64;
const SECONDARY_CAPS: u64 = ffi::FI_LOCAL_COMM | ffi::FI_REMOTE_COMM;
/// Every capability bit the provider can honour.
pub const CAPS: u64 = PRIMARY_CAPS | SECONDARY_CAPS;
const TX_OP_FLAGS: u64 =
    ffi::FI_COMPLETION as u64 | ffi::FI_INJECT_COMPLETE as u64 | ffi::FI_TRANSMIT_COMPLETE as u64;
const RX_OP_FLAGS: u64 = ffi::FI_COMPLETION as u64;
const MSG_ORDER: u64 = ffi::FI_ORDER_SAS as u64;

/// Why the provider has nothing to offer for a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("API version {0:#x} (answers 1.5 to {max:#x})", max = ffi::HEADERS_VERSION)]
    Version(u32),
    #[error("another provider was asked for ({0})")]
    ProviderName(String),
    #[error("fabric {0:?} (only {PROVIDER_NAME:?})")]
    FabricName(String),
    #[error("domain {0:?} (only {PROVIDER_NAME:?})")]
    DomainName(String),
    #[error("node or service given (vfmig resolves no names yet)")]
    NodeService,
    #[error("capabilities {0:#x} not supported")]
    Caps(u64),
    #[error("address format {0} (only FI_ADDR_STR)")]
    AddrFormat(u32),
    #[error("endpoint type {0} (only FI_EP_RDM)")]
    EpType(u32),
    #[error("endpoint protocol {0} (only FI_PROTO_UNSPEC)")]
    Protocol(u32),
    #[error("{what} {asked} is more than vfmig's {max}")]
    TooLarge {
        what: &'static str,
        asked: u64,
        max: u64,
    },
    #[error("threading model {0} (only FI_THREAD_DOMAIN)")]
    Threading(u32),
    #[error("automatic data progress (vfmig progresses in fi_cq_read)")]
    DataProgress,
    #[error("{0} op_flags {1:#x} not supported")]
    OpFlags(&'static str, u64),
    #[error("{0} message order {1:#x} not supported (FI_ORDER_SAS only)")]
    MsgOrder(&'static str, u64),
    #[error("{0} completion order {1:#x} not supported (FI_ORDER_NONE only)")]
    CompOrder(&'static str, u64),
    #[error("authentication keys are not supported")]
    AuthKey,
}

/// An owned copy of the application's `fi_getinfo` hints (absent attributes read as zero).
#[derive(Debug, Clone, Default)]
pub struct Hints {
    pub caps: u64,
    pub mode: u64,
    pub addr_format: u32,
    pub tx: ffi::fi_tx_attr,
    pub rx: ffi::fi_rx_attr,
    pub ep: ffi::fi_ep_attr,
    pub domain: ffi::fi_domain_attr,
    pub fabric: ffi::fi_fabric_attr,
    pub domain_name: Option<String>,
    pub fabric_name: Option<String>,
    pub prov_name: Option<String>,
}

// SAFETY: the raw pointers inside the copied attributes are never dereferenced through Hints
// (names were copied into the Strings); they are plain values.
unsafe impl Send for Hints {}

fn string_at(p: *const std::os::raw::c_char) -> Option<String> {
    if p.is_null() {
        return None;
    }
    // SAFETY: libfabric's attribute names are NUL-terminated C strings when not null.
    Some(unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
}

/// Copies `*p`, or the zeroed default when `p` is null.
///
/// # Safety
/// `p` is null or points to a valid `T`.
unsafe fn copy_or_default<T: Copy + Default>(p: *const T) -> T {
    if p.is_null() {
        T::default()
    } else {
        // SAFETY: the caller guarantees p points to a valid T.
        unsafe { *p }
    }
}

impl Hints {
    /// Copies the hints out of libfabric's `fi_info`.
    ///
    /// # Safety
    /// `info` points to a valid `fi_info` whose attribute pointers are null or valid.
    pub unsafe fn from_c(info: *const ffi::fi_info) -> Hints {
        // SAFETY: the caller guarantees info and its attribute pointers are valid or null.
        unsafe {
            let i = &*info;
            let fabric: ffi::fi_fabric_attr = copy_or_default(i.fabric_attr);
            let domain: ffi::fi_domain_attr = copy_or_default(i.domain_attr);
            Hints {
                caps: i.caps,
                mode: i.mode,
                addr_format: i.addr_format,
                tx: copy_or_default(i.tx_attr),
                rx: copy_or_default(i.rx_attr),
                ep: copy_or_default(i.ep_attr),
                domain_name: string_at(domain.name),
                fabric_name: string_at(fabric.name),
                prov_name: string_at(fabric.prov_name),
                domain,
                fabric,
            }
        }
    }
}

/// What vfmig offers for one request: the values `alloc_info` writes into the `fi_info`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offer {
    pub caps: u64,
    pub tx_op_flags: u64,
    pub rx_op_flags: u64,
    pub threading: u32,
    pub control_progress: u32,
    pub data_progress: u32,
    pub resource_mgmt: u32,
    pub av_type: u32,
}

fn at_most(what: &'static str, asked: u64, max: u64) -> Result<(), Refusal> {
    if asked > max {
        return Err(Refusal::TooLarge { what, asked, max });
    }
    Ok(())
}

fn or(asked: u32, default: u32) -> u32 {
    if asked == 0 {
        default
    } else {
        asked
    }
}

/// The offer for a `fi_getinfo(version, node, service, flags, hints)` call, or why there is
/// none.
pub fn select(
    version: u32,
    node_or_service: bool,
    hints: Option<&Hints>,
) -> Result<Offer, Refusal> {
    if !(MIN_API_VERSION..=ffi::HEADERS_VERSION).contains(&version) {
        return Err(Refusal::Version(version));
    }
    if node_or_service {
        return Err(Refusal::NodeService);
    }
    let Some(h) = hints else {
        return Ok(Offer {
            caps: CAPS,
            tx_op_flags: 0,
            rx_op_flags: 0,
            threading: ffi::FI_THREAD_DOMAIN,
            control_progress: ffi::FI_PROGRESS_MANUAL,
            data_progress: ffi::FI_PROGRESS_MANUAL,
            resource_mgmt: ffi::FI_RM_ENABLED,
            av_type: ffi::FI_AV_MAP,
        });
    };
    if let Some(p) = &h.prov_name {
        if !p.split(';').any(|n| n.eq_ignore_ascii_case(PROVIDER_NAME)) {
            return Err(Refusal::ProviderName(p.clone()));
        }
    }
    if let Some(n) = &h.fabric_name {
        if n != PROVIDER_NAME {
            return Err(Refusal::FabricName(n.clone()));
        }
    }
    if let Some(n) = &h.domain_name {
        if n != PROVIDER_NAME {
            return Err(Refusal::DomainName(n.clone()));
        }
    }
    // Capabilities, of the info and of each attribute.
    for c in [h.caps, h.tx.caps, h.rx.caps, h.domain.caps] {
        if c & !CAPS != 0 {
            return Err(Refusal::Caps(c & !CAPS));
        }
    }
    if h.addr_format != ffi::FI_FORMAT_UNSPEC && h.addr_format != ffi::FI_ADDR_STR {
        return Err(Refusal::AddrFormat(h.addr_format));
    }
    // Endpoint.
    if h.ep.type_ != ffi::FI_EP_UNSPEC && h.ep.type_ != ffi::FI_EP_RDM {
        return Err(Refusal::EpType(h.ep.type_));
    }
    if h.ep.protocol != ffi::FI_PROTO_UNSPEC {
        return Err(Refusal::Protocol(h.ep.protocol));
    }
    if h.ep.auth_key_size != 0 || !h.ep.auth_key.is_null() || !h.domain.auth_key.is_null() {
        return Err(Refusal::AuthKey);
    }
    at_most(
        "max_msg_size",
        h.ep.max_msg_size as u64,
        MAX_MSG_SIZE as u64,
    )?;
    at_most("endpoint tx contexts", h.ep.tx_ctx_cnt as u64, 1)?;
    at_most("endpoint rx contexts", h.ep.rx_ctx_cnt as u64, 1)?;
    // Domain.
    if !matches!(
        h.domain.threading,
        ffi::FI_THREAD_UNSPEC | ffi::FI_THREAD_DOMAIN
    ) {
        return Err(Refusal::Threading(h.domain.threading));
    }
    if h.domain.data_progress == ffi::FI_PROGRESS_AUTO {
        return Err(Refusal::DataProgress);
    }
    at_most(
        "cq_data_size",
        h.domain.cq_data_size as u64,
        CQ_DATA_SIZE as u64,
    )?;
    at_most("domain tx contexts", h.domain.tx_ctx_cnt as u64, 1)?;
    at_most("domain rx contexts", h.domain.rx_ctx_cnt as u64, 1)?;
    at_most("shared tx contexts", h.domain.max_ep_stx_ctx as u64, 0)?;
    at_most("shared rx contexts", h.domain.max_ep_srx_ctx as u64, 0)?;
    at_most("counters", h.domain.cntr_cnt as u64, 0)?;
    // Transmit and receive attributes.
    if h.tx.op_flags & !TX_OP_FLAGS != 0 {
        return Err(Refusal::OpFlags("tx", h.tx.op_flags & !TX_OP_FLAGS));
    }
    if h.rx.op_flags & !RX_OP_FLAGS != 0 {
        return Err(Refusal::OpFlags("rx", h.rx.op_flags & !RX_OP_FLAGS));
    }
    for (side, order) in [("tx", h.tx.msg_order), ("rx", h.rx.msg_order)] {
        if order & !MSG_ORDER != 0 {
            return Err(Refusal::MsgOrder(side, order));
        }
    }
    for (side, order) in [("tx", h.tx.comp_order), ("rx", h.rx.comp_order)] {
        if order != ffi::FI_ORDER_NONE as u64 {
            return Err(Refusal::CompOrder(side, order));
        }
    }
    at_most("inject_size", h.tx.inject_size as u64, INJECT_SIZE as u64)?;
    at_most("tx size", h.tx.size as u64, QUEUE_SIZE as u64)?;
    at_most("rx size", h.rx.size as u64, QUEUE_SIZE as u64)?;
    at_most("tx iov_limit", h.tx.iov_limit as u64, 1)?;
    at_most("rx iov_limit", h.rx.iov_limit as u64, 1)?;
    at_most("rma_iov_limit", h.tx.rma_iov_limit as u64, 0)?;
    at_most(
        "total_buffered_recv",
        h.rx.total_buffered_recv as u64,
        BUFFERED_RECV as u64,
    )?;
    let caps = if h.caps == 0 {
        CAPS
    } else {
        (h.caps & PRIMARY_CAPS) | SECONDARY_CAPS
    };
    Ok(Offer {
        caps,
        tx_op_flags: h.tx.op_flags,
        rx_op_flags: h.rx.op_flags,
        threading: ffi::FI_THREAD_DOMAIN,
        // Control operations (AV insert, enable) complete synchronously: either model holds.
        control_progress: or(h.domain.control_progress, ffi::FI_PROGRESS_MANUAL),
        data_progress: ffi::FI_PROGRESS_MANUAL,
        resource_mgmt: or(h.domain.resource_mgmt, ffi::FI_RM_ENABLED),
        av_type: or(h.domain.av_type, ffi::FI_AV_MAP),
    })
}

fn strdup(s: &str, what: &'static str) -> Result<*mut std::os::raw::c_char, FiError> {
    let c = CString::new(s).map_err(|_| FiError::Invalid("a name with a NUL byte"))?;
    // SAFETY: c is a valid NUL-terminated string; strdup copies it into malloc'd memory, which
    // libfabric's fi_freeinfo releases with free().
    let p = unsafe { libc::strdup(c.as_ptr()) };
    if p.is_null() {
        return Err(FiError::NoMemory(what));
    }
    Ok(p)
}

/// Allocates the `fi_info` for `offer` with libfabric's `fi_dupinfo(NULL)` (every attribute
/// allocated and zeroed), so that the caller frees it with `fi_freeinfo`.
pub fn alloc_info(offer: &Offer) -> Result<*mut ffi::fi_info, FiError> {
    // SAFETY: fi_dupinfo(NULL) allocates a zeroed fi_info with all its attributes, or
    // returns null.
    let info = unsafe { ffi::fi_dupinfo(std::ptr::null()) };
    if info.is_null() {
        return Err(FiError::NoMemory("fi_info"));
    }
    // SAFETY: info and its attributes were just allocated by fi_dupinfo and are ours alone.
    let fill = unsafe { fill_info(&mut *info, offer) };
    if let Err(e) = fill {
        // SAFETY: info came from fi_dupinfo; fi_freeinfo frees it and every name set so far.
        unsafe { ffi::fi_freeinfo(info) };
        return Err(e);
    }
    Ok(info)
}

/// # Safety
/// Every attribute pointer of `info` is valid (as `fi_dupinfo(NULL)` returns them).
unsafe fn fill_info(info: &mut ffi::fi_info, offer: &Offer) -> Result<(), FiError> {
    info.caps = offer.caps;
    info.mode = 0;
    info.addr_format = ffi::FI_ADDR_STR;
    // SAFETY: the caller guarantees the attribute pointers are valid and unaliased.
    let (tx, rx, ep, domain, fabric) = unsafe {
        (
            &mut *info.tx_attr,
            &mut *info.rx_attr,
            &mut *info.ep_attr,
            &mut *info.domain_attr,
            &mut *info.fabric_attr,
        )
    };
    tx.caps = offer.caps & !(ffi::FI_RECV as u64);
    tx.op_flags = offer.tx_op_flags;
    tx.msg_order = MSG_ORDER;
    tx.comp_order = ffi::FI_ORDER_NONE as u64;
    tx.inject_size = INJECT_SIZE;
    tx.size = QUEUE_SIZE;
    tx.iov_limit = 1;
    tx.rma_iov_limit = 0;
    rx.caps = offer.caps & !(ffi::FI_SEND as u64);
    rx.op_flags = offer.rx_op_flags;
    rx.msg_order = MSG_ORDER;
    rx.comp_order = ffi::FI_ORDER_NONE as u64;
    rx.total_buffered_recv = BUFFERED_RECV;
    rx.size = QUEUE_SIZE;
    rx.iov_limit = 1;
    ep.type_ = ffi::FI_EP_RDM;
    ep.protocol = ffi::FI_PROTO_UNSPEC;
    ep.protocol_version = 1;
    ep.max_msg_size = MAX_MSG_SIZE;
    ep.mem_tag_format = MEM_TAG_FORMAT;
    ep.tx_ctx_cnt = 1;
    ep.rx_ctx_cnt = 1;
    domain.threading = offer.threading;
    domain.control_progress = offer.control_progress;
    domain.data_progress = offer.data_progress;
    domain.resource_mgmt = offer.resource_mgmt;
    domain.av_type = offer.av_type;
    domain.mr_mode = 0;
    domain.cq_data_size = CQ_DATA_SIZE;
    domain.cq_cnt = 64;
    domain.ep_cnt = 64;
    domain.tx_ctx_cnt = 1;
    domain.rx_ctx_cnt = 1;
    domain.max_ep_tx_ctx = 1;
    domain.max_ep_rx_ctx = 1;
    domain.caps = offer.caps & SECONDARY_CAPS;
    domain.name = strdup(PROVIDER_NAME, "the domain name")?;
    fabric.name = strdup(PROVIDER_NAME, "the fabric name")?;
    // prov_name stays null: libfabric's core sets it to the provider's name.
    fabric.prov_version = PROVIDER_VERSION;
    fabric.api_version = ffi::HEADERS_VERSION;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const V1_5: u32 = ffi::fi_version(1, 5);

    /// The hints of Open MPI 4.1.4's mtl/ofi (its second call adds FI_REMOTE_CQ_DATA and
    /// cq_data_size 4).
    fn open_mpi_hints() -> Hints {
        let mut h = Hints {
            caps: ffi::FI_TAGGED as u64
                | ffi::FI_LOCAL_COMM
                | ffi::FI_REMOTE_COMM
                | ffi::FI_DIRECTED_RECV,
            mode: ffi::FI_CONTEXT | ffi::FI_CONTEXT2,
            ..Hints::default()
        };
        h.ep.type_ = ffi::FI_EP_RDM;
        h.tx.msg_order = ffi::FI_ORDER_SAS as u64;
        h.rx.msg_order = ffi::FI_ORDER_SAS as u64;
        h.tx.op_flags = ffi::FI_COMPLETION as u64;
        h.rx.op_flags = ffi::FI_COMPLETION as u64;
        h.domain.threading = ffi::FI_THREAD_DOMAIN;
        h.domain.control_progress = ffi::FI_PROGRESS_MANUAL;
        h.domain.av_type = ffi::FI_AV_MAP;
        h.domain.resource_mgmt = ffi::FI_RM_ENABLED;
        h
    }

    #[test]
    fn open_mpi_hints_get_an_rdm_tagged_offer() {
        let offer = select(V1_5, false, Some(&open_mpi_hints())).expect("offer");
        assert_eq!(offer.caps & ffi::FI_TAGGED as u64, ffi::FI_TAGGED as u64);
        assert_ne!(offer.caps & ffi::FI_DIRECTED_RECV, 0);
        assert_eq!(offer.threading, ffi::FI_THREAD_DOMAIN);
        assert_eq!(offer.av_type, ffi::FI_AV_MAP);
        assert_eq!(offer.resource_mgmt, ffi::FI_RM_ENABLED);
        assert_eq!(offer.data_progress, ffi::FI_PROGRESS_MANUAL);
        // Untagged messages were not asked for, so they are not offered.
        assert_eq!(offer.caps & ffi::FI_MSG as u64, 0);
    }

    #[test]
    fn open_mpi_cq_data_hints_and_av_table_are_answered() {
        let mut h = open_mpi_hints();
        h.caps |= ffi::FI_REMOTE_CQ_DATA as u64 | ffi::FI_MSG as u64;
        h.domain.cq_data_size = 4;
        h.domain.av_type = ffi::FI_AV_TABLE;
        let offer = select(V1_5, false, Some(&h)).expect("offer");
        assert_ne!(offer.caps & ffi::FI_REMOTE_CQ_DATA as u64, 0);
        assert_eq!(offer.av_type, ffi::FI_AV_TABLE);
        h.domain.cq_data_size = 8;
        assert!(matches!(
            select(V1_5, false, Some(&h)),
            Err(Refusal::TooLarge {
                what: "cq_data_size",
                asked: 8,
                max: 4
            })
        ));
    }

    #[test]
    fn no_hints_offer_everything() {
        let offer = select(ffi::HEADERS_VERSION, false, None).expect("offer");
        assert_eq!(offer.caps, CAPS);
    }

    #[test]
    fn what_vfmig_cannot_do_is_refused() {
        let refused = |f: &dyn Fn(&mut Hints)| {
            let mut h = open_mpi_hints();
            f(&mut h);
            select(V1_5, false, Some(&h)).expect_err("must be refused")
        };
        assert_eq!(
            refused(&|h| h.ep.type_ = ffi::FI_EP_MSG),
            Refusal::EpType(ffi::FI_EP_MSG)
        );
        assert_eq!(
            refused(&|h| h.ep.type_ = ffi::FI_EP_DGRAM),
            Refusal::EpType(ffi::FI_EP_DGRAM)
        );
        let rma = ffi::FI_RMA as u64;
        assert_eq!(refused(&|h| h.caps |= rma), Refusal::Caps(rma));
        let atomics = ffi::FI_ATOMIC as u64;
        assert_eq!(refused(&|h| h.caps |= atomics), Refusal::Caps(atomics));
        let multi = ffi::FI_MULTI_RECV as u64;
        assert_eq!(refused(&|h| h.rx.caps = multi), Refusal::Caps(multi));
        assert_eq!(
            refused(&|h| h.domain.threading = ffi::FI_THREAD_SAFE),
            Refusal::Threading(ffi::FI_THREAD_SAFE)
        );
        assert_eq!(
            refused(&|h| h.domain.data_progress = ffi::FI_PROGRESS_AUTO),
            Refusal::DataProgress
        );
        assert_eq!(
            refused(&|h| h.addr_format = ffi::FI_SOCKADDR_IN),
            Refusal::AddrFormat(ffi::FI_SOCKADDR_IN)
        );
        assert!(matches!(
            refused(&|h| h.ep.max_msg_size = MAX_MSG_SIZE + 1),
            Refusal::TooLarge {
                what: "max_msg_size",
                ..
            }
        ));
        assert!(matches!(
            refused(&|h| h.domain.cntr_cnt = 1),
            Refusal::TooLarge {
                what: "counters",
                ..
            }
        ));
        let strict = ffi::FI_ORDER_STRICT as u64;
        assert_eq!(
            refused(&|h| h.tx.comp_order = strict),
            Refusal::CompOrder("tx", strict)
        );
        let raw = ffi::FI_ORDER_RAW as u64;
        assert!(matches!(
            refused(&|h| h.rx.msg_order |= raw),
            Refusal::MsgOrder("rx", _)
        ));
        assert_eq!(
            refused(&|h| h.prov_name = Some("tcp;ofi_rxm".into())),
            Refusal::ProviderName("tcp;ofi_rxm".into())
        );
        assert_eq!(
            refused(&|h| h.fabric_name = Some("TCP-IP".into())),
            Refusal::FabricName("TCP-IP".into())
        );
    }

    #[test]
    fn versions_before_1_5_and_after_the_headers_are_refused() {
        let h = open_mpi_hints();
        let v1_4 = ffi::fi_version(1, 4);
        assert_eq!(select(v1_4, false, Some(&h)), Err(Refusal::Version(v1_4)));
        let v2_0 = ffi::fi_version(2, 0);
        assert_eq!(select(v2_0, false, Some(&h)), Err(Refusal::Version(v2_0)));
        assert!(select(ffi::fi_version(1, 17), false, Some(&h)).is_ok());
    }

    #[test]
    fn a_named_node_is_refused() {
        assert_eq!(select(V1_5, true, None), Err(Refusal::NodeService));
    }

    #[test]
    fn our_name_is_accepted_among_others() {
        let mut h = open_mpi_hints();
        h.prov_name = Some("tcp;vfmig".into());
        h.fabric_name = Some("vfmig".into());
        h.domain_name = Some("vfmig".into());
        assert!(select(V1_5, false, Some(&h)).is_ok());
    }

    #[test]
    fn hints_read_back_from_a_c_fi_info() {
        let info = alloc_info(&select(V1_5, false, None).unwrap()).expect("alloc");
        // SAFETY: info came from alloc_info and is freed below, once.
        let h = unsafe { Hints::from_c(info) };
        assert_eq!(h.ep.type_, ffi::FI_EP_RDM);
        assert_eq!(h.addr_format, ffi::FI_ADDR_STR);
        assert_eq!(h.fabric_name.as_deref(), Some("vfmig"));
        assert_eq!(h.domain_name.as_deref(), Some("vfmig"));
        assert_eq!(h.prov_name, None);
        assert_eq!(h.domain.cq_data_size, CQ_DATA_SIZE);
        assert_eq!(h.ep.mem_tag_format, MEM_TAG_FORMAT);
        assert_eq!(h.tx.caps & ffi::FI_RECV as u64, 0);
        assert_eq!(h.rx.caps & ffi::FI_SEND as u64, 0);
        // What we offer, asked back as hints, is offered again (fi_info's round trip).
        let mut again = h.clone();
        again.prov_name = Some(PROVIDER_NAME.into());
        assert!(
            select(V1_5, false, Some(&again)).is_ok(),
            "{:?}",
            select(V1_5, false, Some(&again))
        );
        // SAFETY: info came from fi_dupinfo via alloc_info; libfabric frees it and its names.
        unsafe { ffi::fi_freeinfo(info) };
    }
}
