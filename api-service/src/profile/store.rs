//! Profiles in SQLite.

use async_trait::async_trait;
use sqlx::SqlitePool;

use super::{Profile, ProfilePatch, ProfileStore};
use crate::db::db_error;
use crate::error::ApiError;
use crate::time::{Millis, now_millis};

/// The SQLite profile store.
#[derive(Debug, Clone)]
pub struct SqliteProfiles {
    pool: SqlitePool,
}

impl SqliteProfiles {
    /// Profiles on `pool`.
    pub fn new(pool: SqlitePool) -> Self {
        Self { pool }
    }
}

type Row = (String, Option<String>, Option<String>, Millis, Millis);

fn profile((openid, nickname, avatar_url, created_at, updated_at): Row) -> Profile {
    Profile {
        openid,
        nickname,
        avatar_url,
        created_at,
        updated_at,
    }
}

#[async_trait]
impl ProfileStore for SqliteProfiles {
    async fn get_or_create(&self, openid: &str) -> Result<Profile, ApiError> {
        let now = now_millis();
        // The no-op update makes RETURNING answer for an existing row too, in one statement.
        let row: Row = sqlx::query_as(
            "INSERT INTO profiles (openid, created_at, updated_at) VALUES ($1, $2, $2) \
             ON CONFLICT (openid) DO UPDATE SET openid = excluded.openid \
             RETURNING openid, nickname, avatar_url, created_at, updated_at",
        )
        .bind(openid)
        .bind(now)
        .fetch_one(&self.pool)
        .await
        .map_err(db_error)?;
        Ok(profile(row))
    }

    async fn update(&self, openid: &str, patch: ProfilePatch) -> Result<Profile, ApiError> {
        let current = self.get_or_create(openid).await?;
        let nickname = match patch.nickname {
            None => current.nickname,
            Some(n) => n.map(|n| n.as_str().to_owned()),
        };
        let avatar_url = match patch.avatar_url {
            None => current.avatar_url,
            Some(a) => a.map(|a| a.as_str().to_owned()),
        };
        let row: Row = sqlx::query_as(
            "UPDATE profiles SET nickname = $2, avatar_url = $3, updated_at = $4 WHERE openid = $1 \
             RETURNING openid, nickname, avatar_url, created_at, updated_at",
        )
        .bind(openid)
        .bind(nickname)
        .bind(avatar_url)
        .bind(now_millis())
        .fetch_one(&self.pool)
        .await
        .map_err(db_error)?;
        Ok(profile(row))
    }
}
